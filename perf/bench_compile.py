"""torch.compile (inductor) against the hand-fused eager forward, on the CPU, bf16.

    python perf/bench_compile.py                      # batches 1 and 32, context 200
    python perf/bench_compile.py --batches 1,8,32 --steps 30

Issue 17 asks for a compiled forward, or hand-fused ops where they measure faster.
This measures both on the same machine in the same run, for one decode step of the
bundled model (forward + LM head, no sampling, no IPC):

* `eager-fused`: what `tgi-mp serve` runs: packed oneDNN linears, the C++ paged
  attention, the C++ fused elementwise ops (`kernels/cpu_ops.cpp`), eager Python.
* `compiled-freeze`: the same model with torch's elementwise ops (HF's, op for op)
  under `torch.compile(dynamic=False)` with `torch._inductor.config.freezing`:
  inductor fuses RMSNorm, RoPE, SiLU·mul and the residual adds, runs no Python per
  op, and packs the (plain `nn.Linear`) weights for oneDNN itself, as it does for
  any frozen CPU model. The C++ attention and the cache write enter the graph as
  custom ops (`tgi_mp_bench::*`), so the graph does not break at attention.

The compiled forward is compiled once per batch size (dynamic=False: one graph per
token count, as a bucketed server would), and the compile time is reported. The
two are timed in interleaved rounds (this machine's speed drifts), and their logits
are compared with the eager path's, and with the same unpacked model run eagerly
(`plain`: torch's elementwise ops, no compile).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
import torch
from profile_step import _model

from tgi_mp.executor.models.llama import TORCH_OPS
from tgi_mp.executor.weights import load_model
from tgi_mp.kernels import cpu_attention
from tgi_mp.kernels.attention import AttentionMetadata, allocate_kv_cache
from tgi_mp.kernels.backends import AttentionBackend
from tgi_mp.model_source import load_model_config, resolve_model

# The C++ kernel and the reference cache write, registered as they are (their type
# hints give the schemas); fakes give dynamo their outputs' shapes without running them.
_attention = torch.library.custom_op(
    "tgi_mp_bench::paged_attention", cpu_attention.paged_attention, mutates_args=()
)
_attention.register_fake(
    lambda q, *rest: torch.empty_like(q, memory_format=torch.contiguous_format)
)
_write_kv = torch.library.custom_op(
    "tgi_mp_bench::write_kv", AttentionBackend.scatter, mutates_args=("k_cache", "v_cache")
)
_write_kv.register_fake(lambda *args: None)


class CustomOpAttention(AttentionBackend):
    """The C++ kernel and the cache write as custom ops: opaque to dynamo, no break."""

    name = "cpu-custom-op"
    reference_plan = False

    def write_kv(self, k, v, k_cache, v_cache, meta) -> None:
        torch.ops.tgi_mp_bench.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)

    def attend(self, q, k_cache, v_cache, meta, scale):
        return torch.ops.tgi_mp_bench.paged_attention(
            q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale,
            True,
        )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if not cpu_attention.fast_path_available():
        raise SystemExit("needs the AVX512_BF16 CPU attention (bf16 is float32's speed here)")
    src = resolve_model(None)
    cfg = load_model_config(src)
    eager = _model(src, cfg, torch.bfloat16, None, "cpu")
    # Unpacked nn.Linear weights: inductor's graph cannot take oneDNN's opaque packed
    # tensors as inputs; with freezing it packs them itself (the same oneDNN kernel).
    plain = load_model(src, cfg, torch.bfloat16, "cpu", attention=CustomOpAttention(), pack=False)
    plain.use_ops(TORCH_OPS)

    def forward(model, ids, positions, kv, meta):
        hidden = model(ids, positions, kv, meta)
        return model.compute_logits(hidden)

    print(f"context {args.context}, {torch.get_num_threads()} threads, bf16, forward + LM head")
    print()
    print("| batch | eager-fused ms | compiled-freeze ms | compiled / eager speed | compile s |")
    print("|---|---|---|---|---|")
    torch._inductor.config.freezing = True
    compiled = torch.compile(forward, dynamic=False)
    notes = []
    for batch in (int(b) for b in args.batches.split(",")):
        bs = 16
        nb = -(-(args.context + 1) // bs)
        kv = allocate_kv_cache(
            cfg.num_layers, batch * nb, bs, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16, "cpu"
        )
        for k_cache, v_cache in kv:  # a context that matters to the logits
            k_cache.normal_()
            v_cache.normal_()
        tables = np.arange(batch * nb, dtype=np.int32).reshape(batch, nb)
        meta = AttentionMetadata.build(
            np.ones(batch, np.int32), np.full(batch, args.context, np.int32), tables, bs, "cpu",
            reference=False,
        )  # fmt: skip
        ids = torch.randint(0, cfg.vocab_size, (batch,))
        step = (ids, meta.positions, kv, meta)
        runs = {
            "eager": partial(forward, eager, *step),
            "plain": partial(forward, plain, *step),
            "compiled": partial(compiled, plain, *step),
        }
        with torch.inference_mode():
            t0 = time.perf_counter()
            runs["compiled"]()  # one graph per token count (dynamic=False)
            compile_s = time.perf_counter() - t0
            out = {name: run() for name, run in runs.items()}
            times: dict[str, list[float]] = {"eager": [], "compiled": []}
            for _ in range(args.rounds):  # interleaved: this machine's speed drifts
                for name in times:
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        runs[name]()
                    times[name].append((time.perf_counter() - t0) / args.steps)
        e, c = (float(np.median(times[n])) for n in ("eager", "compiled"))
        print(f"| {batch} | {e * 1e3:.1f} | {c * 1e3:.1f} | {e / c:.2f}x | {compile_s:.1f} |")
        for name in ("plain", "compiled"):
            agree = (out[name].argmax(-1) == out["eager"].argmax(-1)).float().mean().item()
            diff = (out[name] - out["eager"]).abs().max().item()
            notes.append(
                f"batch {batch}, {name} vs eager-fused: argmax agrees on {agree:.0%} "
                f"of rows, max |logit diff| {diff:.2f}"
            )
    print()
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
