"""One executor decode step in isolation, per weight mode, against its bandwidth bound.

    python perf/profile_step.py                                    # bf16, int8, int4 at 1, 32
    python perf/profile_step.py --modes float32 --batches 32 --profile
    python perf/profile_step.py --modes bfloat16 --batches 32 --sample
    python perf/profile_step.py --attention torch,cpu-unfused,cpu   # the CPU kernels' shares

Runs the bundled model's forward + logits + argmax for `batch` decode rows over a
paged KV cache of `--context` tokens each (no processes, no IPC). A decode step
must read every weight its kernels touch once, plus the sequences' K/V: the bytes
are counted from the modules (an int4 / int8 projection reads its packed weights
up to `quant.SMALL_BATCH` rows and its dense copy above; a tied embedding is read
whole by the LM head), and the floor is bytes / the host's copy bandwidth,
measured here in the same run (`bench_step.copy_bandwidth`).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from bench_step import copy_bandwidth
from torch import nn

from tgi_mp.executor import quant
from tgi_mp.executor.logits import LogitsPipeline, RowInputs
from tgi_mp.executor.models.llama import TORCH_OPS
from tgi_mp.executor.packed import PackedLinear
from tgi_mp.executor.penalties import apply_penalties
from tgi_mp.executor.sampler import SamplingTensors
from tgi_mp.executor.weights import load_model
from tgi_mp.kernels.attention import AttentionMetadata, allocate_kv_cache
from tgi_mp.kernels.backends import select_backend
from tgi_mp.model_source import load_model_config, resolve_model

MODES = {  # name -> (activation dtype, --quantize)
    "float32": (torch.float32, None),
    "bfloat16": (torch.bfloat16, None),
    "int8": (torch.bfloat16, "int8"),
    "int4": (torch.bfloat16, "int4"),
}


def weight_bytes_read(model: nn.Module, rows: int) -> int:
    """Weight bytes one decode step of `rows` sequences reads (see the module doc)."""
    total = 0
    # An int4 projection's packed dense copy is its child: counted by its parent.
    quantized = (quant.Int4Linear, quant.Int8Linear)
    copies = {id(m.dense_linear) for m in model.modules() if isinstance(m, quantized)}
    for module in model.modules():
        if id(module) in copies:
            continue
        if isinstance(module, quant.Int4Linear):
            packed = rows <= quant.SMALL_BATCH
            total += module.nbytes() if packed else module.dense_nbytes()
        elif isinstance(module, PackedLinear):
            total += module.nbytes
        elif isinstance(module, quant.Int8Linear):
            packed = rows <= quant.SMALL_BATCH or module.dense_linear is None
            total += module.nbytes() if packed else module.dense_linear.nbytes
        elif isinstance(module, nn.Embedding):
            # Read whole by a tied LM head; else (or when a packed head reads its own
            # copy, counted above) by the rows looked up.
            whole = model.lm_head is None and model.packed_head is None
            total += module.weight.nbytes if whole else rows * module.weight[0].nbytes
        else:
            total += sum(p.nbytes for p in module.parameters(recurse=False))
        if getattr(module, "bias", None) is not None and not isinstance(module, nn.Linear):
            total += module.bias.nbytes
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--modes", default="bfloat16,int8,int4", help=f"of {', '.join(MODES)}")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile", action="store_true", help="print torch profiler's top ops")
    ap.add_argument(
        "--attention",
        default="auto",
        help="--attention of tgi-mp serve, or several to compare in one run "
        "(e.g. torch,cpu-unfused,cpu: cpu-unfused is the C++ attention without the fused ops)",
    )
    ap.add_argument(
        "--sample",
        action="store_true",
        help="sample with temperature 0.8, top_k 50, top_p 0.9 and repetition_penalty 1.1 "
        "(over a 200-token history), seeded",
    )
    args = ap.parse_args()
    bandwidth = copy_bandwidth(torch.device("cpu"))
    print(
        f"context {args.context}, {torch.get_num_threads()} threads, copy bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s; forward + logits + "
        f"{'sampling' if args.sample else 'argmax'}, no IPC"
    )
    print()
    columns = (
        "mode | attention | batch | step ms | weights read MB | bound ms | step / bound | tok/s "
        "| sampler"
    )
    print(f"| {columns} |")
    print("|---|---|---|---|---|---|---|---|---|")
    src = resolve_model(None)
    cfg = load_model_config(src)
    for mode in args.modes.split(","):
        dtype, method = MODES[mode]
        names = args.attention.split(",")
        variants = {name: _model(src, cfg, dtype, method, name) for name in names}
        for batch in (int(b) for b in args.batches.split(",")):
            for name, model in variants.items():
                times, sampler_times, step = measure(args, model, cfg, dtype, batch)
                step_s, sampler_s = float(np.median(times)), float(np.median(sampler_times))
                kv = 2 * cfg.num_layers * batch * args.context * cfg.num_kv_heads * cfg.head_dim
                read = weight_bytes_read(model, batch)
                bound = (read + kv * dtype.itemsize) / bandwidth
                print(
                    f"| {mode} | {name} | {batch} | {step_s * 1e3:.1f} | {read / 1e6:.0f} | "
                    f"{bound * 1e3:.1f} | {step_s / bound:.2f} | {batch / step_s:.0f} | "
                    f"{sampler_s / step_s:.1%} |"
                )
                if args.profile:
                    from torch.profiler import profile

                    with profile() as prof:
                        for _ in range(3):
                            step()
                    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def _model(src, cfg, dtype: torch.dtype, method: str | None, variant: str) -> nn.Module:
    """The model as `tgi-mp serve --attention variant` loads it; `cpu-unfused`: the C++
    attention with torch's elementwise ops (what the fused layer ops save)."""
    attention, _ = select_backend(variant.removesuffix("-unfused"), torch.device("cpu"), dtype, 16)
    model = load_model(src, cfg, dtype, "cpu", attention=attention, quantize=method)
    if variant.endswith("-unfused"):
        model.use_ops(TORCH_OPS)
    model.reference_plan = attention.reference_plan
    return model


def measure(args: argparse.Namespace, model: nn.Module, cfg, dtype: torch.dtype, b: int):
    """(step seconds, sampler seconds, the step) of `args.steps` timed decode steps."""
    bs = 16
    nb = -(-(args.context + 1) // bs)
    kv = allocate_kv_cache(cfg.num_layers, b * nb, bs, cfg.num_kv_heads, cfg.head_dim, dtype, "cpu")
    tables = np.arange(b * nb, dtype=np.int32).reshape(b, nb)
    query = np.ones(b, np.int32)
    context = np.full(b, args.context, np.int32)
    ids = torch.randint(0, cfg.vocab_size, (b,))

    columns = SamplingTensors(
        temperature=torch.full((b,), 0.8 if args.sample else 0.0),
        top_k=torch.full((b,), 50),
        top_p=torch.full((b,), 0.9),
        typical_p=torch.ones(b),
        min_p=torch.zeros(b),
        seeds=torch.arange(b),
        sample_index=torch.zeros(b, dtype=torch.int64),
    )
    sampler_times: list[float] = []
    pipeline = LogitsPipeline(cfg.vocab_size, torch.device("cpu"), 0.25, 2.0)
    history = torch.zeros(b, cfg.vocab_size, dtype=torch.bool)
    history[:, torch.randint(0, cfg.vocab_size, (args.context,))] = True
    counts = history.to(torch.int32)
    repetition, zero = torch.full((b,), 1.1), torch.zeros(b)

    @torch.inference_mode()
    def step() -> None:
        meta = AttentionMetadata.build(
            query, context, tables, bs, "cpu", reference=model.reference_plan
        )
        logits = model.compute_logits(model(ids, meta.positions, kv, meta))
        t = time.perf_counter()
        if args.sample:  # the executor applies penalties just before sampling
            logits = apply_penalties(logits, history, counts, repetition, zero, zero)
        pipeline(logits, RowInputs(columns, 0))  # what the executor runs on them
        sampler_times.append(time.perf_counter() - t)

    for _ in range(3):
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times, sampler_times[3:], step


if __name__ == "__main__":
    main()
