"""bf16 linears with their weights reordered once for oneDNN, on the CPU.

`F.linear` on a bf16 CPU tensor reorders the weight into oneDNN's blocked layout on
every call; `mkldnn._reorder_linear_weight` does it once at load and
`mkldnn._linear_pointwise` runs on the result (what inductor's freezing pass emits).
Same kernel, same results bit for bit, minus the per-call reorder: measured on 2
AVX512-BF16 cores (`perf/bench_linears.py`, perf/RESULTS.md), SmolLM2's 30 layers
of projections take 8.2 instead of 9.6 ms at 1 row and 13.4 instead of 16.6 at 32;
its LM head 1.05 vs 1.75 ms and 2.87 vs 3.59. float32 is left alone: oneDNN's float32 kernel rounds
differently from the one `F.linear` uses, and float32 is the exact oracle path.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from tgi_mp.executor.quant import TARGETS, Int4Linear, Int8Linear


def packing_applies(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and _onednn_bf16()


@functools.cache
def _onednn_bf16() -> bool:
    """Whether oneDNN's bf16 linear runs here: it needs AVX512 (BW, VL, DQ) or
    AVX-NE-CONVERT, and says so only when asked (an AVX2-only CPU runs bf16 `F.linear`
    through torch's own kernels instead)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), None)
    except RuntimeError:
        return False
    return True


class PackedLinear(nn.Module):
    """y = x W^T + b with W in oneDNN's layout (an opaque tensor: no views of it)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.nbytes = weight.numel() * weight.element_size()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)


@torch.no_grad()
def pack_model(model: nn.Module) -> int:
    """Packs the decoder's dense projections, dense copies for the int4 / int8 ones'
    big steps, and the LM head (a packed copy when the embedding is tied: the lookup
    keeps the plain table). Returns the number of linears packed."""
    count = 0
    for module in list(model.modules()):
        for name in TARGETS:
            linear = getattr(module, name, None)
            if isinstance(linear, nn.Linear):
                setattr(module, name, PackedLinear(linear.weight, linear.bias))
                count += 1
            elif isinstance(linear, Int4Linear):
                linear.pack_dense(PackedLinear(linear.dense, linear.bias))
                count += 1
            elif isinstance(linear, Int8Linear):  # a dense copy: no dequantize per big step
                linear.pack_dense(PackedLinear(linear.dequantized(), linear.bias))
                count += 1
    lm_head = model.lm_head
    head_weight = model.model.embed_tokens.weight if lm_head is None else lm_head.weight
    model.packed_head = PackedLinear(head_weight, None)
    if lm_head is not None:  # untied: the packed copy replaces it (no second copy kept)
        model.lm_head = None
    return count + 1
