"""Attention backends: one interface, chosen once at start-up (`--attention`).

* `torch`: the reference in `attention.py` (the oracle of every test; the CPU default
  for float32).
* `cpu`: our C++ kernel in `cpu_attention.cpp` (the CPU default for bfloat16 on CPUs
  with AVX512_BF16): paged K/V read in place, online softmax, float32 accumulation.
* `triton`: our kernels in `triton_attention.py` (CUDA default). Mixed steps go to the
  varlen kernel, all-decode steps to split-KV decode (CUDA-graph friendly).
* `flash-attn`: Dao-AILab's paged varlen kernel, used only when the package imports,
  the block size suits it (its paged path needs blocks of a multiple of 256 tokens)
  and it passes a self-check against the reference at start.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from tgi_mp.kernels import attention as reference
from tgi_mp.kernels.attention import AttentionMetadata
from tgi_mp.options import CHOICES

log = logging.getLogger("tgi_mp.kernels")


class AttentionBackend:
    """Writes a step's K/V into the paged cache and attends over it; the
    reference's cache write unless a backend has its own."""

    name = "torch"
    reference_plan = True  # attends with the host-side plan (`AttentionMetadata.host`)
    scatter = staticmethod(reference.write_kv)  # (k, v, k_cache, v_cache, slot_mapping)

    def write_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        self.scatter(k, v, k_cache, v_cache, meta.slot_mapping)

    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        return reference.paged_attention(q, k_cache, v_cache, meta, scale)

    def layer_ops(self, model: torch.nn.Module, dtype: torch.dtype, device: torch.device):
        """Fused elementwise ops for the model's layers that come with this backend's
        kernels (`executor.models.llama.LayerOps`' interface), or None: torch's ops."""
        return None


TorchAttention = AttentionBackend
TORCH_ATTENTION = TorchAttention()


class TritonAttention(AttentionBackend):
    name = "triton"
    reference_plan = False  # the kernels read device tensors only

    def __init__(self) -> None:
        from tgi_mp.kernels import triton_attention  # imports triton: only when chosen

        self.kernels = triton_attention
        self.scatter = triton_attention.write_kv

    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        if meta.all_decode:
            return self.kernels.decode_attention(
                q, k_cache, v_cache, meta.seq_lens, meta.block_tables, scale
            )
        return self.kernels.varlen_attention(
            q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale
        )


class CpuAttention(AttentionBackend):
    name = "cpu"
    reference_plan = False  # reads the device (host) tensors only

    def __init__(self) -> None:
        from tgi_mp.kernels import cpu_attention  # builds the kernel on first use

        self.kernel = cpu_attention
        # Without AVX512_BF16 the kernel's portable path runs: exact but slow; the
        # problem check keeps `auto` from choosing it.
        self.fast = cpu_attention.fast_path_available()

    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        return self.kernel.paged_attention(
            q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
            scale, self.fast,
        )  # fmt: skip

    def layer_ops(self, model: torch.nn.Module, dtype: torch.dtype, device: torch.device):
        from tgi_mp.kernels import cpu_ops

        return cpu_ops.FusedLayerOps() if cpu_ops.supports(model, dtype, device) else None


class FlashAttention(AttentionBackend):
    """flash-attn 2's `flash_attn_varlen_func` over the block table (its causal mask is
    aligned bottom-right: each sequence's cached context comes first)."""

    name = "flash-attn"

    def __init__(self) -> None:
        from flash_attn import flash_attn_varlen_func

        self.varlen = flash_attn_varlen_func

    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        cu_k = torch.zeros(meta.seq_lens.shape[0] + 1, dtype=torch.int32, device=q.device)
        torch.cumsum(meta.seq_lens, 0, out=cu_k[1:])
        return self.varlen(
            q,
            k_cache,
            v_cache,
            meta.query_start_loc.to(torch.int32),
            cu_k,
            max(meta.host.query_lens),
            max(meta.host.seq_lens),
            softmax_scale=scale,
            causal=True,
            block_table=meta.block_tables.to(torch.int32),
        )


class BackendUnavailable(RuntimeError):
    pass


# (query heads, KV heads, head dim) of one rank's attention; the self-check's default.
Shape = tuple[int, int, int]
CHECK_SHAPE: Shape = (9, 3, 64)


def self_check(
    backend: AttentionBackend,
    device: torch.device,
    dtype: torch.dtype,
    block_size: int,
    shape: Shape = CHECK_SHAPE,
) -> float:
    """Largest difference to the reference over a mixed step (prefix chunk, fresh prompt,
    decode rows) and an all-decode step (the split-KV kernels that CUDA graphs replay),
    at the model's head shape; raises BackendUnavailable past tolerance."""
    gen = torch.Generator().manual_seed(0)
    mixed = ([7, 1, 20, 1], [block_size + 3, 40, 0, 2 * block_size])
    decode = ([1, 1, 1, 1], [0, block_size + 1, 40, 2 * block_size])
    steps = (mixed, decode)
    err = max(_step_error(backend, device, dtype, block_size, shape, *s, gen) for s in steps)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    if not err <= tol:
        raise BackendUnavailable(
            f"{backend.name} failed its self-check: max error {err:.3g} > {tol}"
        )
    return err


def _step_error(
    backend: AttentionBackend,
    device: torch.device,
    dtype: torch.dtype,
    block_size: int,
    shape: Shape,
    query_lens: list[int],
    context_lens: list[int],
    gen: torch.Generator,
) -> float:
    heads, kv_heads, dim = shape
    seqs = [q + c for q, c in zip(query_lens, context_lens, strict=True)]
    need = [-(-s // block_size) for s in seqs]
    perm = torch.randperm(sum(need), generator=gen).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(perm[at : at + n] + [0] * (max(need) - n))
        at += n
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_size, device)
    shape = (sum(need), block_size, kv_heads, dim)
    k_cache = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    v_cache = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    t = sum(query_lens)
    q = torch.randn(t, heads, dim, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(t, kv_heads, dim, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(t, kv_heads, dim, generator=gen).to(device=device, dtype=dtype)
    backend.write_kv(k, v, k_cache, v_cache, meta)
    got = backend.attend(q, k_cache, v_cache, meta, dim**-0.5).float()
    want = reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, dim**-0.5)
    return (got - want).abs().max().item()


def _triton_problem(
    device: torch.device, dtype: torch.dtype, block_size: int, shape: Shape, auto: bool
) -> str | None:
    """Why Triton cannot run here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1, for testing)"
    return None


def select_backend(
    requested: str,
    device: torch.device,
    dtype: torch.dtype,
    block_size: int,
    shape: Shape = CHECK_SHAPE,
) -> tuple[AttentionBackend, str]:
    """The backend for `--attention requested` and the model's head `shape`, and why
    (logged at start).

    Each candidate must be usable here and pass its self-check against the reference.
    An explicit choice that fails is an error naming the reason; `auto` tries
    flash-attn, then Triton on CUDA, the C++ kernel on a CPU, and falls back to torch.
    """
    if requested not in CHOICES["attention"]:
        choices = ", ".join(CHOICES["attention"])
        raise ValueError(f"--attention must be one of {choices}, got {requested!r}")
    if requested == "torch":
        return TorchAttention(), "--attention torch"
    if requested != "auto":
        candidates = [requested]
    else:
        candidates = ["flash-attn", "triton"] if device.type == "cuda" else ["cpu"]
    notes = []
    for name in candidates:
        why = _PROBLEMS[name](device, dtype, block_size, shape, requested == "auto")
        if why is None:
            try:
                backend = _BACKENDS[name]()
                err = self_check(backend, device, dtype, block_size, shape)
                return backend, f"{requested} on {device.type}, self-check max error {err:.2g}"
            except Exception as e:  # any failure means: not this backend
                why = f"{type(e).__name__}: {e}"
        if requested != "auto":
            raise BackendUnavailable(f"--attention {name}: {why}")
        notes.append(f"{name}: {why}")
    return TorchAttention(), "; ".join([f"auto on {device.type}", *notes])


def _cpu_problem(
    device: torch.device, dtype: torch.dtype, block_size: int, shape: Shape, auto: bool
) -> str | None:
    if device.type != "cpu":
        return "the C++ kernel runs on the CPU"
    if dtype != torch.bfloat16:
        return f"the C++ kernel takes bfloat16, not {str(dtype).removeprefix('torch.')}"
    if auto and not torch.cpu._is_avx512_bf16_supported():
        return "this CPU has no AVX512_BF16 (the kernel's portable path is slower than torch)"
    heads, kv_heads, dim = shape
    if auto and (dim % 32 or heads // kv_heads > 64):
        return (
            f"the kernel's fast path needs a head dim divisible by 32 and at most 64 query "
            f"heads per KV head, not {dim} and {heads // kv_heads}"
        )
    return None


def _flash_attn_problem(
    device: torch.device, dtype: torch.dtype, block_size: int, shape: Shape, auto: bool
) -> str | None:
    if device.type != "cuda":
        return "flash-attn needs a CUDA device"
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed (pip install 'tgi-mp[gpu]')"
    if block_size % 256:
        return f"its paged kernels need a block size that is a multiple of 256, not {block_size}"
    return None


_PROBLEMS = {"flash-attn": _flash_attn_problem, "triton": _triton_problem, "cpu": _cpu_problem}
_BACKENDS = {"flash-attn": FlashAttention, "triton": TritonAttention, "cpu": CpuAttention}
