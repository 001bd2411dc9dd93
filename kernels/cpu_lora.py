"""The LoRA delta of a decode batch in one C++ call per projection (`cpu_lora.cpp`):
each token through its own adapter only, bf16 on the CPU."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch

from tgi_mp.kernels import cpu_build
from tgi_mp.kernels.cpu_build import I64, PTR

_INT = ctypes.c_int
_SIGNATURES = (
    (
        "tgi_lora",
        None,
        (_INT, PTR, I64, I64, PTR, PTR, PTR, I64, PTR, PTR, I64, I64, PTR, PTR, I64),
    ),
    ("tgi_lora_have_avx512_bf16", _INT, ()),
)
MAX_RANK = 256  # the kernel's per-token scratch
BLOCK = 8  # tokens of one slot per work item (kBlock in cpu_lora.cpp)


class LoraKernel:
    def __init__(self, fast: bool | None = None) -> None:
        """`fast`: the AVX512-BF16 code (default: where the CPU has it), else plain loops."""
        self.lib = cpu_build.library("cpu_lora", _SIGNATURES)
        have = bool(self.lib.tgi_lora_have_avx512_bf16())
        self.fast = int(have if fast is None else fast and have)

    def __call__(
        self,
        x: torch.Tensor,
        blocks: TokenBlocks,
        a: torch.Tensor,
        bt: torch.Tensor,
        subs: int,
        rank: int,
        offs: torch.Tensor,
        y: torch.Tensor,
    ) -> None:
        """y [T, out] += each adapter token's delta. x [T, in] and y: bf16 with contiguous
        rows; a and bt bf16: [S, subs, rank, in] and [S, rank * out], offs int64 [subs + 1]."""
        self.lib.tgi_lora(
            self.fast, x.data_ptr(), x.stride(0), x.shape[1], blocks.order.data_ptr(),
            blocks.bounds.data_ptr(), blocks.slots.data_ptr(), len(blocks.slots), a.data_ptr(),
            bt.data_ptr(), subs, rank, offs.data_ptr(), y.data_ptr(), y.stride(0),
        )  # fmt: skip


@dataclass
class TokenBlocks:
    """A step's adapter tokens as blocks of at most `BLOCK` on one slot (the kernel
    loads each weight once per block): int32 token order, block bounds, block slots."""

    order: torch.Tensor
    bounds: torch.Tensor
    slots: torch.Tensor

    @classmethod
    def of(cls, token_slots: np.ndarray) -> TokenBlocks:
        used = np.flatnonzero(token_slots >= 0)
        order = used[np.argsort(token_slots[used], kind="stable")]
        slots = token_slots[order]
        # A block starts at each slot change and every BLOCK tokens within a slot.
        change = np.flatnonzero(np.diff(slots, prepend=-2) != 0)
        run = np.arange(len(order)) - np.repeat(change, np.diff(np.append(change, len(order))))
        starts = np.flatnonzero(run % BLOCK == 0)
        return cls(
            torch.from_numpy(order.astype(np.int32)),
            torch.from_numpy(np.append(starts, len(order)).astype(np.int32)),
            torch.from_numpy(slots[starts].astype(np.int32)),
        )
