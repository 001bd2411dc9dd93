"""The bf16 decoder layer's elementwise chain on the CPU, fused (`cpu_ops.cpp`): the
same interface as `executor.models.llama.LayerOps`, three C++ calls where eager torch
runs ~35 small ops a layer."""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from tgi_mp.kernels import cpu_build
from tgi_mp.kernels.cpu_build import F32, I64, PTR

_INT = ctypes.c_int
_SIGNATURES = (
    ("tgi_add_rms_norm", None, (_INT, PTR, PTR, PTR, PTR, I64, I64, I64, I64, I64, F32)),
    ("tgi_silu_mul", None, (_INT, PTR, PTR, I64, I64, I64, I64)),
    ("tgi_rope", None, (_INT, PTR, PTR, PTR, I64, I64, I64, I64)),
    ("tgi_ops_have_avx512", _INT, ()),
)


class FusedLayerOps:
    """In place where torch would allocate: `add_rms_norm` adds into `hidden`, `rope`
    rotates q and k inside the qkv projection's output. bf16 tensors whose last dim is
    contiguous (the model's own activations; checked once, at load, by `supports`)."""

    def __init__(self, fast: bool | None = None) -> None:
        """`fast`: the AVX-512 rows (default: where the CPU has AVX-512), else plain loops."""
        self.lib = cpu_build.library("cpu_ops", _SIGNATURES)
        have = bool(self.lib.tgi_ops_have_avx512())
        self.fast = int(have if fast is None else fast and have)

    def add_rms_norm(
        self, hidden: torch.Tensor, delta: torch.Tensor | None, norm: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, dim = hidden.shape
        out = torch.empty((rows, dim), dtype=hidden.dtype)
        self.lib.tgi_add_rms_norm(
            self.fast, hidden.data_ptr(), None if delta is None else delta.data_ptr(),
            norm.weight.data_ptr(), out.data_ptr(), rows, dim, hidden.stride(0),
            0 if delta is None else delta.stride(0), dim, norm.eps,
        )  # fmt: skip
        return hidden, out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        rows, width = gate_up.shape
        out = torch.empty((rows, width // 2), dtype=gate_up.dtype)
        self.lib.tgi_silu_mul(
            self.fast, gate_up.data_ptr(), out.data_ptr(), rows, width // 2, gate_up.stride(0),
            width // 2,
        )  # fmt: skip
        return out

    def rope(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for x in (q, k):
            rows, heads, dim = x.shape
            self.lib.tgi_rope(
                self.fast, x.data_ptr(), cos.data_ptr(), sin.data_ptr(), rows, heads, dim,
                x.stride(0),
            )  # fmt: skip
        return q, k


def supports(model: nn.Module, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the fused ops may run this model: bf16 on the CPU, every norm bf16."""
    if dtype != torch.bfloat16 or device.type != "cpu":
        return False
    norms = [m for m in model.modules() if type(m).__name__ == "RMSNorm"]
    return all(m.weight.dtype == torch.bfloat16 and m.weight.is_contiguous() for m in norms)
