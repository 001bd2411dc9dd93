"""Reference paged attention against dense causal attention computed without a cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tgi_mp.kernels.attention import (
    AttentionInputs,
    AttentionMetadata,
    allocate_kv_cache,
    paged_attention,
    write_kv,
)

BS = 4  # small blocks: many block boundaries, partly filled last blocks


def dense_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: int, scale: float
) -> torch.Tensor:
    """q [Lq, H, D] at positions ctx..ctx+Lq-1; k, v [L, KVH, D] for positions 0..L-1."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), kk) * scale
    pos = torch.arange(ctx, ctx + q.shape[0])
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > pos[:, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv)


def scrambled_tables(
    seq_lens: list[int], rng: np.random.Generator, width: int
) -> tuple[np.ndarray, int]:
    need = [-(-n // BS) for n in seq_lens]
    ids = rng.permutation(sum(need) + 3)  # a few spare blocks stay unused
    tables = np.full((len(seq_lens), width), -1, dtype=np.int32)  # -1 padding, as a scheduler may
    at = 0
    for i, n in enumerate(need):
        tables[i, :n] = ids[at : at + n]
        at += n
    return tables, len(ids)


def run_case(
    ctx: list[int], qlen: list[int], heads: int, kv_heads: int, dtype: torch.dtype
) -> None:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    d, scale = 16, 16**-0.5
    lens = [c + n for c, n in zip(ctx, qlen, strict=True)]
    tables, nblocks = scrambled_tables(lens, rng, width=max(-(-n // BS) for n in lens) + 2)
    ((k_cache, v_cache),) = allocate_kv_cache(1, nblocks, BS, kv_heads, d, dtype, "cpu")
    ks = [torch.randn(n, kv_heads, d, dtype=dtype) for n in lens]
    vs = [torch.randn(n, kv_heads, d, dtype=dtype) for n in lens]
    # The cached prefix, written by an earlier (prefill) step ...
    if sum(ctx):
        pre = AttentionMetadata.build(np.array(ctx), np.zeros(len(ctx)), tables, BS, "cpu")
        write_kv(
            torch.cat([k[:c] for k, c in zip(ks, ctx, strict=True)]),
            torch.cat([v[:c] for v, c in zip(vs, ctx, strict=True)]),
            k_cache,
            v_cache,
            pre.slot_mapping,
        )
    # ... then this step's tokens.
    meta = AttentionMetadata.build(np.array(qlen), np.array(ctx), tables, BS, "cpu")
    write_kv(
        torch.cat([k[c:] for k, c in zip(ks, ctx, strict=True)]),
        torch.cat([v[c:] for v, c in zip(vs, ctx, strict=True)]),
        k_cache,
        v_cache,
        meta.slot_mapping,
    )
    qs = [torch.randn(n, heads, d, dtype=dtype) for n in qlen]
    out = paged_attention(torch.cat(qs), k_cache, v_cache, meta, scale)
    ref = torch.cat(
        [dense_reference(q, k, v, c, scale) for q, k, v, c in zip(qs, ks, vs, ctx, strict=True)]
    )
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


CASES = {
    "prefill_ragged": ([0, 0, 0], [5, 17, 33]),
    "decode_ragged": ([0, 3, 15, 16, 47, 100], [1, 1, 1, 1, 1, 1]),
    # decodes with long context, a chunk on top of a cached prefix, a fresh prompt
    "mixed": ([70, 32, 3, 0, 13], [1, 20, 1, 9, 6]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (8, 2)])
def test_paged_attention_matches_dense(case: str, heads: int, kv_heads: int) -> None:
    run_case(*CASES[case], heads, kv_heads, torch.float32)


@pytest.mark.parametrize("case", list(CASES))
def test_paged_attention_bf16(case: str) -> None:
    run_case(*CASES[case], 9, 3, torch.bfloat16)


def test_build_positions_and_slots() -> None:
    ctx, qlen = np.array([5, 0, 9], dtype=np.int32), np.array([3, 6, 1], dtype=np.int32)
    tables = np.array([[7, 2, 0], [4, 1, -1], [3, 5, 6]], dtype=np.int32)
    meta = AttentionMetadata.build(qlen, ctx, tables, BS, "cpu")
    positions, slots = [], []
    for i in range(3):
        for p in range(ctx[i], ctx[i] + qlen[i]):
            positions.append(p)
            slots.append(tables[i, p // BS] * BS + p % BS)
    assert meta.positions.tolist() == positions and meta.positions.dtype == torch.int64
    assert meta.slot_mapping.tolist() == slots and meta.slot_mapping.dtype == torch.int64
    assert meta.query_start_loc.tolist() == [0, 3, 9, 10]
    assert meta.seq_lens.tolist() == [8, 6, 10]
    assert meta.host.decode_rows.tolist() == [9] and meta.host.prefill_seqs == [0, 1]
    assert not meta.all_decode
    # Kernels need no host plan; a caller may upload the arrays with its own.
    for reference in (True, False):
        inputs = AttentionInputs.plan(qlen, ctx, tables, BS, reference=reference)
        mine = np.array([5, 6])
        tensors = [torch.from_numpy(a) for a in [*inputs.arrays, mine]]
        m = inputs.on_device(tensors[:-1])
        assert (m.host is not None) == reference and tensors[-1].tolist() == [5, 6]
        assert torch.equal(m.slot_mapping, meta.slot_mapping)
    with pytest.raises(ValueError, match="reference=True"):
        cache = torch.zeros(8, BS, 2, 8)
        paged_attention(torch.zeros(10, 2, 8), cache, cache, m, 1.0)


def test_write_kv_puts_tokens_at_their_slots() -> None:
    ((k_cache, v_cache),) = allocate_kv_cache(1, 6, BS, 2, 8, torch.float32, "cpu")
    slots = torch.tensor([13, 0, 22, 5, 7])
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    write_kv(k, v, k_cache, v_cache, slots)
    for t, s in enumerate(slots.tolist()):
        assert torch.equal(k_cache[s // BS, s % BS], k[t]) and torch.equal(
            v_cache[s // BS, s % BS], v[t]
        )
    untouched = torch.ones(6 * BS, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache.view(-1, 2, 8)[untouched].any()
