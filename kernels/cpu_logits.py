"""Passes over a step's float32 logits on the CPU (`cpu_logits.cpp`): greedy rows'
tokens and logprobs, and grammar bitmasks applied in place."""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from tgi_mp.kernels import cpu_build
from tgi_mp.kernels.cpu_build import F32, I64, PTR

_SIGNATURES = (
    ("tgi_logits_have_avx512", ctypes.c_int, ()),
    ("tgi_mask_logits", None, (ctypes.c_int, PTR, I64, I64, PTR, I64, PTR, I64, F32)),
    ("tgi_greedy", None, (ctypes.c_int, PTR, I64, I64, I64, PTR, PTR)),
)


class CpuLogits:
    """Raises `cpu_build.KernelUnavailable` at construction where the kernels cannot be
    built (no compiler). Logits: float32 `[B, V]` on the CPU, unit stride along V."""

    def __init__(self, banned: float) -> None:
        self.lib = cpu_build.library("cpu_logits", _SIGNATURES)
        self.fast = int(self.lib.tgi_logits_have_avx512())
        self.value = -banned

    def greedy(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's first argmax (int64 `[B]`) and its log-softmax (float32 `[B]`), as
        `argmax` and `log_softmax(...).gather(...)` give them, in one read of the rows."""
        _check(logits)
        rows, vocab = logits.shape
        tokens = torch.empty(rows, dtype=torch.int64)
        logprobs = torch.empty(rows, dtype=torch.float32)
        self.lib.tgi_greedy(
            self.fast, logits.data_ptr(), rows, vocab, logits.stride(0), tokens.data_ptr(),
            logprobs.data_ptr(),
        )  # fmt: skip
        return tokens, logprobs

    def mask(self, logits: torch.Tensor, rows: torch.Tensor, bitmask: np.ndarray) -> None:
        """Sets `logits[rows[i], t]` to `-banned` wherever bit t of `bitmask[i]` is clear;
        rows: int64 `[G]`, distinct; bitmask: int32 `[G, W]`, W * 32 >= V."""
        _check(logits)
        words = np.ascontiguousarray(bitmask, dtype=np.int32)
        count, width = words.shape
        if count != len(rows) or width * 32 < logits.shape[1]:
            raise ValueError(
                f"a bitmask of {words.shape} does not cover {len(rows)} rows of "
                f"{logits.shape[1]} tokens"
            )
        rows = rows.to(torch.int64).contiguous()
        self.lib.tgi_mask_logits(
            self.fast, logits.data_ptr(), logits.stride(0), logits.shape[1], rows.data_ptr(),
            count, words.ctypes.data, width, self.value,
        )  # fmt: skip


def _check(logits: torch.Tensor) -> None:
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.stride(1) != 1:
        raise ValueError("the CPU logits kernels take float32 CPU logits, unit stride along V")
