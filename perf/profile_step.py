"""One executor decode step in isolation: time per step, and where it goes.

    python perf/profile_step.py --batch 32 --context 200 --dtype float32
    python perf/profile_step.py --batch 32 --dtype bfloat16 --profile

Runs the bundled model's forward + logits + argmax for `--batch` decode rows
over a paged KV cache of `--context` tokens each (no processes, no IPC).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from tgi_mp.executor.penalties import apply_penalties
from tgi_mp.executor.sampler import SamplingTensors, sample
from tgi_mp.executor.weights import load_model
from tgi_mp.kernels.attention import AttentionMetadata, allocate_kv_cache
from tgi_mp.model_source import load_model_config, resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile", action="store_true", help="print torch profiler's top ops")
    ap.add_argument(
        "--sample",
        action="store_true",
        help="sample with temperature 0.8, top_k 50, top_p 0.9 and repetition_penalty 1.1 "
        "(over a 200-token history), seeded",
    )
    args = ap.parse_args()

    src = resolve_model(None)
    cfg = load_model_config(src)
    dtype = getattr(torch, args.dtype)
    model = load_model(src, cfg, dtype, "cpu")
    bs, b = 16, args.batch
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
    history = torch.zeros(b, cfg.vocab_size, dtype=torch.bool)
    history[:, torch.randint(0, cfg.vocab_size, (args.context,))] = True
    counts = history.to(torch.int32)
    repetition, zero = torch.full((b,), 1.1), torch.zeros(b)

    @torch.inference_mode()
    def step() -> None:
        meta = AttentionMetadata.build(query, context, tables, bs, "cpu")
        logits = model.compute_logits(model(ids, meta.positions, kv, meta))
        t = time.perf_counter()
        if args.sample:  # the executor applies penalties just before sampling
            logits = apply_penalties(logits, history, counts, repetition, zero, zero)
        sample(logits, columns)
        sampler_times.append(time.perf_counter() - t)

    for _ in range(3):
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    report(args, model, times, sampler_times)
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            for _ in range(3):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def report(
    args: argparse.Namespace, model: torch.nn.Module, times: list[float], sampler_times: list[float]
) -> None:
    b = args.batch
    weight_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    print(
        f"batch {b}, context {args.context}, {args.dtype}, {torch.get_num_threads()} threads: "
        f"step median {np.median(times) * 1e3:.1f} ms (min {min(times) * 1e3:.1f}); "
        f"weights {weight_mb:.0f} MB -> {b / np.median(times):.0f} tok/s"
    )
    sampler = np.median(sampler_times[-args.steps :])
    kind = "repetition penalty + top-k/top-p sampling" if args.sample else "greedy"
    print(
        f"sampler ({kind}): {sampler * 1e3:.2f} ms = {sampler / np.median(times):.1%} of the step"
    )


if __name__ == "__main__":
    main()
