"""Grammar bitmasks applied to the logits in place on the CPU (`cpu_logits.cpp`)."""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from tgi_mp.kernels import cpu_build
from tgi_mp.kernels.cpu_build import F32, I64, PTR

_SIGNATURES = (
    ("tgi_logits_have_avx512", ctypes.c_int, ()),
    ("tgi_mask_logits", None, (ctypes.c_int, PTR, I64, I64, PTR, I64, PTR, I64, F32)),
)


class TokenMasker:
    """Sets banned tokens' logits to `-banned`; raises `cpu_build.KernelUnavailable`
    at construction where the kernel cannot be built (no compiler)."""

    def __init__(self, banned: float) -> None:
        self.lib = cpu_build.library("cpu_logits", _SIGNATURES)
        self.fast = int(self.lib.tgi_logits_have_avx512())
        self.value = -banned

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor, bitmask: np.ndarray) -> None:
        """logits: float32 `[B, V]` on the CPU, unit stride along V; rows: int64 `[G]`,
        distinct; bitmask: int32 `[G, W]`, W * 32 >= V."""
        if logits.dtype != torch.float32 or logits.stride(1) != 1:
            raise ValueError("the mask kernel takes float32 logits contiguous along the vocabulary")
        mask = np.ascontiguousarray(bitmask, dtype=np.int32)
        count, words = mask.shape
        if count != len(rows) or words * 32 < logits.shape[1]:
            raise ValueError(
                f"a bitmask of {mask.shape} does not cover {len(rows)} rows of "
                f"{logits.shape[1]} tokens"
            )
        rows = rows.to(torch.int64).contiguous()
        self.lib.tgi_mask_logits(
            self.fast, logits.data_ptr(), logits.stride(0), logits.shape[1], rows.data_ptr(),
            count, mask.ctypes.data, words, self.value,
        )  # fmt: skip
