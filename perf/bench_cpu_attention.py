"""The CPU attention kernel alone against the torch reference, per layer call.

    python perf/bench_cpu_attention.py

One layer's attention (9 query / 3 KV heads of 64, the bundled model's shape; bf16
paged cache, 16-token blocks in random order) for a prompt chunk over a cached
context and for decode batches: the torch reference (`kernels/attention.py`: gather
into a padded copy, torch's flash SDPA), the C++ kernel's AVX512_BF16 path and its
portable path, timed in the same run. FLOP/s count the causal part only for the
chunk; GB/s count the K/V the decode rows read.
"""

from __future__ import annotations

import time

import torch

from tgi_mp.kernels import attention as reference
from tgi_mp.kernels import cpu_attention
from tgi_mp.kernels.attention import AttentionMetadata

HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 16
CASES = {  # name -> (query lens, context lens)
    "chunk 256 over 0": ([256], [0]),
    "chunk 256 over 1280": ([256], [1280]),
    "decode 1 at 500": ([1], [500]),
    "decode 8 at 1000": ([1] * 8, [1000] * 8),
    "decode 32 at 500": ([1] * 32, [500] * 32),
}


def _best_ms(fn, repeats: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def _step(query_lens: list[int], context_lens: list[int], gen: torch.Generator):
    need = [-(-(q + c) // BLOCK) for q, c in zip(query_lens, context_lens, strict=True)]
    perm = torch.randperm(sum(need), generator=gen).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(perm[at : at + n] + [0] * (max(need) - n))
        at += n
    meta = AttentionMetadata.build(query_lens, context_lens, tables, BLOCK, "cpu")
    shape = (sum(need), BLOCK, KV_HEADS, DIM)
    k_cache = torch.randn(shape, generator=gen).bfloat16()
    v_cache = torch.randn(shape, generator=gen).bfloat16()
    q = (2 * torch.randn(sum(query_lens), HEADS, DIM, generator=gen)).bfloat16()
    return q, k_cache, v_cache, meta


def main() -> None:
    fast = cpu_attention.fast_path_available()
    print(f"{torch.get_num_threads()} threads, AVX512_BF16 path: {'yes' if fast else 'no'}")
    print()
    print("| step | torch ms | kernel ms | kernel / torch | portable ms | kernel rate |")
    print("|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for name, (query_lens, context_lens) in CASES.items():
        print(_row(name, query_lens, context_lens, gen, fast))


def _row(name: str, query_lens: list[int], context_lens: list[int], gen, fast: bool) -> str:
    q, k_cache, v_cache, meta = _step(query_lens, context_lens, gen)
    scale = DIM**-0.5

    def kernel(fast_path: bool) -> torch.Tensor:
        return cpu_attention.paged_attention(
            q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
            scale, fast_path,
        )  # fmt: skip

    torch_ms = _best_ms(lambda: reference.paged_attention(q, k_cache, v_cache, meta, scale))
    portable_ms = _best_ms(lambda: kernel(False), repeats=3)
    ms = _best_ms(lambda: kernel(True)) if fast else portable_ms
    if query_lens[0] > 1:  # causal QK^T and PV over each row's visible keys
        lens = zip(query_lens, context_lens, strict=True)
        visible = sum(c + i + 1 for n, c in lens for i in range(n))
        rate = f"{4 * HEADS * DIM * visible / ms / 1e6:.0f} GFLOP/s"
    else:
        kv = 2 * sum(c + 1 for c in context_lens) * KV_HEADS * DIM * 2
        rate = f"{kv / ms / 1e6:.1f} GB/s"
    return (
        f"| {name} | {torch_ms:.2f} | {ms:.2f} | {torch_ms / ms:.2f}x | "
        f"{portable_ms:.2f} | {rate} |"
    )


if __name__ == "__main__":
    main()
