"""Triton paged-attention kernels against the torch reference.

Without a GPU they run under TRITON_INTERPRET=1 (tests/conftest.py) in fp32 and fp16;
with one, the same cases run on it, bf16 included (`pytest -m kernels`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tgi_mp.kernels import triton_attention as tk
from tgi_mp.kernels.attention import AttentionMetadata, paged_attention, write_kv

# Interpreted on the CPU without a GPU (tests/conftest.py); on the GPU with one.
DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]
DTYPES = [(d, t) for d in DEVICES for t in (torch.float32, torch.float16)] + (
    [("cuda", torch.bfloat16)] if "cuda" in DEVICES else []
)
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
pytestmark = pytest.mark.kernels


def scrambled_step(
    rng: np.random.Generator, ctx: list[int], qlen: list[int], block_size: int
) -> tuple[AttentionMetadata, int]:
    """Metadata for one step over randomly placed blocks; table entries past each
    sequence's blocks are -1 (as the executor pads them); returns it and the block count."""
    seq = np.array(ctx) + np.array(qlen)
    need = -(-seq // block_size)
    ids = rng.permutation(int(need.sum()) + 5)  # spare blocks hold other data
    tables = np.full((len(seq), int(need.max()) + 2), -1, dtype=np.int64)
    at = 0
    for i, n in enumerate(need):
        tables[i, :n] = ids[at : at + n]
        at += n
    meta = AttentionMetadata.build(np.array(qlen), np.array(ctx), tables, block_size, "cpu")
    return meta, len(ids)


def run_step(
    device: str,
    dtype: torch.dtype,
    ctx: list[int],
    qlen: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    seed: int = 0,
    block_size: int = 16,
    decode: bool = False,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(Triton output, reference output, tolerance) for one step; also checks write_kv."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    meta, blocks = scrambled_step(rng, ctx, qlen, block_size)
    t = sum(qlen)
    cache_shape = (blocks, block_size, kv_heads, head_dim)
    k_cache, v_cache = torch.randn(cache_shape).to(dtype), torch.randn(cache_shape).to(dtype)
    # Fused QKV rows, sliced as the model slices them: strided rows for the kernels.
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q, k, v = (x.view(t, -1, head_dim) for x in (q, k, v))
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    scale = head_dim**-0.5
    ref = paged_attention(q.double(), k_cache.double(), v_cache.double(), meta, scale)

    dev = torch.device(device)
    kc, vc = torch.randn(cache_shape).to(dtype), torch.randn(cache_shape).to(dtype)
    kc[:], vc[:] = k_cache, v_cache
    slots = meta.slot_mapping.clone()
    kc.view(-1, kv_heads, head_dim)[slots] = 0  # the kernel must write these rows
    vc.view(-1, kv_heads, head_dim)[slots] = 0
    kc, vc, qkv_d = kc.to(dev), vc.to(dev), qkv.to(dev)
    qd, kd, vd = qkv_d.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    qd, kd, vd = (x.view(t, -1, head_dim) for x in (qd, kd, vd))
    tk.write_kv(kd, vd, kc, vc, slots.to(dev))
    assert torch.equal(kc.cpu(), k_cache) and torch.equal(vc.cpu(), v_cache)
    seq_lens, tables = meta.seq_lens.to(dev), meta.block_tables.to(dev)
    if decode:
        out = tk.decode_attention(qd, kc, vc, seq_lens, tables, scale, num_splits)
    else:
        out = tk.varlen_attention(qd, kc, vc, meta.query_start_loc.to(dev), seq_lens, tables, scale)
    return out.cpu().double(), ref, TOL[dtype]


GQA = [(8, 8), (9, 3), (8, 2), (16, 2)]  # ratios 1, 3, 4, 8


@pytest.mark.parametrize(("device", "dtype"), DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads"), GQA)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_varlen_mixed_batch(
    device: str, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int
) -> None:
    """Fresh prompts, chunks after a cached prefix and decode rows in one step; ragged
    lengths, partly filled last blocks."""
    ctx = [0, 37, 16, 5, 0, 90]
    qlen = [23, 12, 1, 1, 1, 70]
    out, ref, tol = run_step(device, dtype, ctx, qlen, heads, kv_heads, head_dim, seed=heads)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize(("device", "dtype"), DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads"), GQA)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_split_kv(
    device: str, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int
) -> None:
    ctx = [0, 15, 16, 47, 130, 260]  # 1-token context up to many blocks; last blocks partial
    out, ref, tol = run_step(
        device, dtype, ctx, [1] * len(ctx), heads, kv_heads, head_dim, seed=head_dim, decode=True
    )
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 2, 8, 16])
def test_decode_every_split_count_agrees(device: str, num_splits: int) -> None:
    """Splits longer than the sequence stay empty and must weigh nothing in the merge."""
    ctx = [3, 40, 200]
    out, ref, tol = run_step(
        device, torch.float32, ctx, [1, 1, 1], 9, 3, 64, decode=True, num_splits=num_splits
    )
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_small_blocks_and_long_prefix(device: str) -> None:
    """Block size 4 (many boundaries inside a key tile) and a chunk after a long prefix."""
    out, ref, tol = run_step(device, torch.float32, [300, 2], [9, 30], 9, 3, 64, block_size=4)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_padding_rows_are_inert(device: str) -> None:
    """What CUDA-graph padding relies on: slot -1 writes nothing, seq_len 0 reads
    nothing and gives zeros, and real rows are unaffected by the padding beside them."""
    dev = torch.device(device)
    kc = torch.randn(4, 16, 2, 64, device=dev)
    vc = torch.randn(4, 16, 2, 64, device=dev)
    before_k, before_v = kc.clone(), vc.clone()
    k = torch.randn(3, 2, 64, device=dev)
    tk.write_kv(k, k, kc, vc, torch.tensor([-1, 17, -1], device=dev))
    for cache, before in ((kc, before_k), (vc, before_v)):
        changed = (cache != before).view(-1, 2 * 64).any(1).nonzero().flatten().tolist()
        assert changed == [17] and torch.equal(cache.view(-1, 2, 64)[17], k[1])

    q = torch.randn(3, 6, 64, device=dev)
    seq_lens = torch.tensor([20, 0, 0], device=dev)
    tables = torch.tensor([[2, 1], [0, 0], [0, 0]], device=dev)
    padded = tk.decode_attention(q, kc, vc, seq_lens, tables, 0.125)
    alone = tk.decode_attention(q[:1], kc, vc, seq_lens[:1], tables[:1], 0.125)
    assert torch.equal(padded[1:], torch.zeros_like(padded[1:]))
    torch.testing.assert_close(padded[:1], alone, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("seqs", "kv_heads", "splits"), [(1, 1, 16), (1, 8, 16), (8, 8, 8), (64, 8, 1), (1000, 8, 1)]
)
def test_decode_split_heuristic(seqs: int, kv_heads: int, splits: int) -> None:
    assert tk.decode_splits(seqs, kv_heads) == splits
