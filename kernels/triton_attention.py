"""Paged attention in Triton: the same contract as `attention.py`'s torch reference.

Three kernels over the `[num_blocks, block_size, num_kv_heads, head_dim]` cache:

* `write_kv`: each new token's K/V row to its slot (slot < 0: a padding row, skipped).
* `varlen_attention`: any mix of prefill chunks and decode rows. A program owns one
  KV head and a tile of one sequence's queries; the query heads sharing that KV head
  are packed into the tile's rows (row m = query token m // G, head m % G), so each
  K/V tile is loaded once for all G heads — any ratio, 3 included. Token i of a
  sequence with `context` cached tokens sits at position context + i and sees keys
  0..context + i: chunked prefill and prefix hits are the same code.
* `decode_attention`: one query token per sequence, its keys split into NUM_SPLITS
  ranges processed in parallel (few sequences still fill the GPU), each writing a
  partial output and its log-sum-exp; `_merge_splits` combines them. Grid and
  scratch depend only on the batch size, so the call can be captured in a CUDA graph.

Softmax is online (running max and sum) in fp32, scores in base 2 (`exp2` with the
scale folded into log2(e)). Sequences with `seq_len == 0` are padding and give zeros.
Under `TRITON_INTERPRET=1` all of this runs on the CPU (fp32/fp16; the interpreter has
no bf16), which is how CI checks it against the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_k, stride_v,
    ROW: tl.constexpr, ROW_PAD: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, ROW_PAD)
        mask = offs < ROW
        k = tl.load(k_ptr + t * stride_k + offs, mask=mask)
        v = tl.load(v_ptr + t * stride_v + offs, mask=mask)
        tl.store(k_cache_ptr + slot * ROW + offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + slot * ROW + offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter `k`, `v` `[T, num_kv_heads, head_dim]` (rows may be strided, each row
    contiguous: slices of a fused QKV output) into their slots."""
    t, heads, dim = k.shape
    if t == 0:
        return
    assert k.stride(2) == 1 and k.stride(1) == dim and v.stride(2) == 1 and v.stride(1) == dim
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    row = heads * dim
    _write_kv_kernel[(t,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), v.stride(0),
        ROW=row, ROW_PAD=triton.next_power_of_2(row),
    )  # fmt: skip


@triton.jit
def _find_sequence(query_start_ptr, num_seqs, block_idx, BLOCK_Q: tl.constexpr):
    """The sequence whose query tiles include program `block_idx`: sequence s owns
    tiles starting at query_start[s] // BLOCK_Q + s (one spare tile per sequence
    keeps this a closed form the host can size the grid by)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_ptr + mid) // BLOCK_Q + mid
        if first_tile <= block_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(
    q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, k_pos, k_ok, visible,
    kv_head, d, d_ok, scale_log2, stride_cb, stride_cs, stride_ch,
    BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One key tile of the online softmax: loads the tile's K/V through the block
    table (key p of the sequence at block table[p // BLOCK_SIZE], offset p % BLOCK_SIZE)
    and folds the `visible` scores into the running max, sum and output."""
    block = tl.load(table + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
    kv_off = (
        block[:, None] * stride_cb + (k_pos % BLOCK_SIZE)[:, None] * stride_cs
        + kv_head * stride_ch + d[None, :]
    )  # fmt: skip
    kv_mask = k_ok[:, None] & d_ok[None, :]
    k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows that have seen no visible key yet keep m = -inf: subtract 0, not -inf (NaN).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _varlen_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    query_start_ptr, seq_lens_ptr, block_tables_ptr,
    num_seqs, scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_sequence(query_start_ptr, num_seqs, tile, BLOCK_Q)
    q_begin = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_begin
    q_tile = tile - (q_begin // BLOCK_Q + seq)
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len
    if q_tile * BLOCK_Q < q_len:
        rows = tl.arange(0, BLOCK_M)
        q_idx = q_tile * BLOCK_Q + rows // G  # token index inside this step's chunk
        head = kv_head * G + rows % G
        row_ok = (rows < BLOCK_Q * G) & (q_idx < q_len)
        q_pos = context + q_idx
        d = tl.arange(0, HEAD_PAD)
        d_ok = d < HEAD_DIM
        q = tl.load(
            q_ptr + (q_begin + q_idx)[:, None].to(tl.int64) * stride_qt
            + head[:, None] * stride_qh + d[None, :],
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        )  # fmt: skip
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
        # Keys past the tile's last query position are invisible to every row.
        last_key = context + tl.minimum((q_tile + 1) * BLOCK_Q, q_len)
        table = block_tables_ptr + seq.to(tl.int64) * stride_bt
        for start in range(0, last_key, TILE_N):
            k_pos = start + tl.arange(0, TILE_N)
            k_ok = k_pos < last_key
            visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, k_pos, k_ok, visible,
                kv_head, d, d_ok, scale_log2, stride_cb, stride_cs, stride_ch,
                BLOCK_SIZE, PRECISION,
            )  # fmt: skip
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + (q_begin + q_idx)[:, None].to(tl.int64) * stride_ot
            + head[:, None] * stride_oh + d[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )  # fmt: skip


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (the default tf32 would be ~1e-3 off the reference).
    return "ieee" if dtype == torch.float32 else "tf32"


def _rows(group: int, minimum: int) -> int:
    return max(minimum, triton.next_power_of_2(group))


def varlen_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    block_m: int = 64,
    tile_n: int = 32,
) -> torch.Tensor:
    """Causal paged attention for `q` `[T, H, D]`: rows `query_start_loc[s]` to
    `query_start_loc[s+1]` are the last tokens of sequence s (of `seq_lens[s]`), whose
    keys, those rows' own included, are in the blocks of `block_tables[s]`."""
    t, heads, dim = q.shape
    num_seqs = seq_lens.shape[0]
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    rows = _rows(group, block_m)
    block_q = rows // group
    out = torch.empty_like(q)
    if t == 0:
        return out
    assert q.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    grid = (t // block_q + num_seqs, kv_heads)
    _varlen_kernel[grid](
        q, k_cache, v_cache, out,
        query_start_loc, seq_lens, block_tables,
        num_seqs, scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        G=group, BLOCK_Q=block_q, BLOCK_M=rows, TILE_N=tile_n, BLOCK_SIZE=block_size,
        HEAD_DIM=dim, HEAD_PAD=triton.next_power_of_2(dim), PRECISION=_precision(q.dtype),
    )  # fmt: skip
    return out


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, part_out_ptr, part_lse_ptr,
    seq_lens_ptr, block_tables_ptr, scale_log2,
    stride_qt, stride_qh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    G: tl.constexpr, BLOCK_M: tl.constexpr, NUM_SPLITS: tl.constexpr,
    TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    # Tile-aligned ranges, so splits never share a tile.
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), TILE_N) * TILE_N
    k_begin = split * per_split
    k_end = tl.minimum(k_begin + per_split, seq_len)

    rows = tl.arange(0, BLOCK_M)
    head = kv_head * G + rows
    row_ok = rows < G
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )  # fmt: skip
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(k_begin, k_end, TILE_N):
        k_pos = start + tl.arange(0, TILE_N)
        k_ok = k_pos < k_end
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, k_pos, k_ok, k_ok[None, :],
            kv_head, d, d_ok, scale_log2, stride_cb, stride_cs, stride_ch,
            BLOCK_SIZE, PRECISION,
        )  # fmt: skip
    # An empty split (short sequence, or padding) leaves lse = -inf: weight 0 in the merge.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    base = (seq.to(tl.int64) * (G * tl.num_programs(1)) + head) * NUM_SPLITS + split
    tl.store(part_lse_ptr + base, lse, mask=row_ok)
    tl.store(
        part_out_ptr + base[:, None] * HEAD_PAD + d[None, :],
        out,
        mask=row_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    head = tl.program_id(1)
    base = (seq.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS
    splits = tl.arange(0, NUM_SPLITS)
    lse = tl.load(part_lse_ptr + base + splits)
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.math.exp2(lse - top)  # 0 for empty splits
    total = tl.sum(w, 0)
    d = tl.arange(0, HEAD_PAD)
    parts = tl.load(part_out_ptr + (base + splits)[:, None] * HEAD_PAD + d[None, :])
    merged = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(
        out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + d,
        merged.to(out_ptr.dtype.element_ty),
        mask=d < HEAD_DIM,
    )


def decode_splits(num_seqs: int, kv_heads: int, target_programs: int = 512) -> int:
    """Splits per sequence so that the grid has about `target_programs` programs
    (a power of two, 1..16): many splits for a few sequences, one for big batches."""
    want = max(1, target_programs // max(1, num_seqs * kv_heads))
    return min(16, 1 << (want.bit_length() - 1))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    tile_n: int = 16,
) -> torch.Tensor:
    """Attention of one query token per sequence (`q` `[B, H, D]`, row b is
    sequence b, at position seq_lens[b] - 1) over its cached keys."""
    b, heads, dim = q.shape
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    splits = num_splits or decode_splits(b, kv_heads)
    assert splits & (splits - 1) == 0, "num_splits must be a power of two"
    head_pad = triton.next_power_of_2(dim)
    out = torch.empty_like(q)
    if b == 0:
        return out
    part_out = torch.empty((b, heads, splits, head_pad), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((b, heads, splits), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(b, kv_heads, splits)](
        q, k_cache, v_cache, part_out, part_lse,
        seq_lens, block_tables, scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        G=group, BLOCK_M=_rows(group, 16), NUM_SPLITS=splits, TILE_N=tile_n,
        BLOCK_SIZE=block_size, HEAD_DIM=dim, HEAD_PAD=head_pad, PRECISION=_precision(q.dtype),
    )  # fmt: skip
    _merge_splits_kernel[(b, heads)](
        part_out, part_lse, out, out.stride(0), out.stride(1),
        NUM_SPLITS=splits, HEAD_DIM=dim, HEAD_PAD=head_pad,
    )  # fmt: skip
    return out
