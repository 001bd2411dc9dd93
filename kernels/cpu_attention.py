"""The CPU paged-attention kernel (`cpu_attention.cpp`), built and loaded by `cpu_build`."""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from tgi_mp.kernels import cpu_build
from tgi_mp.kernels.cpu_build import F32, I64, PTR, KernelUnavailable

__all__ = ["KernelUnavailable", "fast_path_available", "library", "paged_attention"]

_SIGNATURES = (
    ("tgi_cpu_attention_has_fast_path", ctypes.c_int, ()),
    (
        "tgi_cpu_paged_attention",
        ctypes.c_int,
        (ctypes.c_int, PTR, I64, I64, PTR, PTR, PTR, PTR, PTR, PTR, *[I64] * 6, F32),
    ),
)


@cache  # looked up by every layer's call: no argument hashing on the hot path
def library() -> ctypes.CDLL:
    return cpu_build.library("cpu_attention", _SIGNATURES)


def fast_path_available() -> bool:
    """The AVX512_BF16 path: built in (x86-64) and supported by this CPU."""
    return bool(library().tgi_cpu_attention_has_fast_path()) and (
        torch.cpu._is_avx512_bf16_supported()
    )


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    fast: bool,
) -> torch.Tensor:
    """Causal attention of `q` `[T, H, D]` (bf16) over the bf16 paged cache
    `[blocks, block_size, KVH, D]`, as `kernels.attention.paged_attention`."""
    if q.dtype != torch.bfloat16 or k_cache.dtype != torch.bfloat16:
        raise KernelUnavailable(f"the CPU kernel takes bfloat16, not {q.dtype}/{k_cache.dtype}")
    if q.stride(-1) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise KernelUnavailable("the CPU kernel needs unit-stride head dims and contiguous caches")
    if any(x.dtype != torch.int64 for x in (query_start, seq_lens, block_tables)):
        raise KernelUnavailable("the CPU kernel reads int64 metadata")
    t, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    out = torch.empty((t, heads, dim), dtype=q.dtype)
    query_start, seq_lens = query_start.contiguous(), seq_lens.contiguous()
    tables = block_tables.contiguous()
    args = (
        q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
        out.data_ptr(), query_start.data_ptr(), seq_lens.data_ptr(), tables.data_ptr(),
        tables.shape[1], seq_lens.shape[0], heads, kv_heads, dim, block_size, scale,
    )  # fmt: skip
    status = library().tgi_cpu_paged_attention(int(fast), *args)
    if status and fast:  # a shape the fast path does not take: the portable one may
        status = library().tgi_cpu_paged_attention(0, *args)
    if status:
        raise KernelUnavailable(
            f"the CPU kernel does not take heads={heads}, kv_heads={kv_heads}, head_dim={dim}"
        )
    return out
