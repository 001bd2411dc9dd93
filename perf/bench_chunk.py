"""Time of one prompt chunk by its size and the context before it (the CPU step budget).

    python perf/bench_chunk.py                          # bf16, chunks 128..2048
    python perf/bench_chunk.py --dtype float32 --chunks 256,512 --contexts 0,1024

A step that carries a prompt chunk takes as long as the chunk's forward, and every
running stream waits for it: the step budget (`--max-batch-prefill-tokens`) bounds
the inter-token latency of everyone else while long prompts arrive. One forward of
`chunk` new tokens over `context` cached ones (the engine's model code, paged KV,
the attention backend `--attention` picks), logits for the last token; best of `--repeats`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from tgi_mp.executor.weights import load_model
from tgi_mp.kernels.attention import AttentionMetadata, allocate_kv_cache
from tgi_mp.kernels.backends import select_backend
from tgi_mp.model_source import load_model_config, resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--chunks", default="128,256,512,1024,2048")
    ap.add_argument("--contexts", default="0,1024")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attention", default="auto", help="--attention of tgi-mp serve")
    args = ap.parse_args()
    src = resolve_model(None)
    cfg = load_model_config(src)
    dtype = getattr(torch, args.dtype)
    attention, _ = select_backend(args.attention, torch.device("cpu"), dtype, 16)
    model = load_model(src, cfg, dtype, "cpu", attention=attention)
    chunks = [int(c) for c in args.chunks.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    bs = 16
    blocks = -(-(max(chunks) + max(contexts)) // bs)
    kv = allocate_kv_cache(cfg.num_layers, blocks, bs, cfg.num_kv_heads, cfg.head_dim, dtype, "cpu")
    table = np.arange(blocks)[None, :]

    @torch.inference_mode()
    def forward(chunk: int, context: int) -> float:
        lens = np.array([chunk]), np.array([context])
        meta = AttentionMetadata.build(*lens, table, bs, "cpu", reference=attention.reference_plan)
        ids = torch.randint(0, cfg.vocab_size, (chunk,))
        t0 = time.perf_counter()
        hidden = model(ids, meta.positions, kv, meta)
        model.compute_logits(hidden[-1:])
        return time.perf_counter() - t0

    print(f"{args.dtype}, {attention.name} attention, {torch.get_num_threads()} threads")
    print()
    print("| chunk tokens | context tokens | step s | prompt tok/s |")
    print("|---|---|---|---|")
    for chunk in chunks:
        for context in contexts:
            forward(chunk, context)  # warm-up
            best = min(forward(chunk, context) for _ in range(args.repeats))
            print(f"| {chunk} | {context} | {best:.3f} | {chunk / best:.0f} |")


if __name__ == "__main__":
    main()
