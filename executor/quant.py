"""Weight-only quantization of a loaded model's linear layers (`--quantize`).

`int8`: each output channel's weights scaled into -127..127 (symmetric, one scale
per row), from any float checkpoint, at load. A decode step reads half of bf16's
bytes. Small batches run torch's int8 x float kernel (`_weight_int8pack_mm`,
int8 -> float inside its tiles); above `SMALL_BATCH` rows that kernel falls behind
a float GEMM (cpu-speed.md measures it), so big steps dequantize the weight once
per call and run `F.linear`. Measured (perf/RESULTS.md): with bf16 activations
int8 is faster than bf16 weights; with float32 ones it is slower than float32
weights, so the runner warns about that combination.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tgi_mp.options import CHOICES

SMALL_BATCH = 16  # rows up to which the int8 kernel beats dequantize + float GEMM
# The linears of each decoder layer that are quantized (embeddings and LM head are not).
_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 rows and one float scale per row."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight_int8", weight)  # int8 [out, in]
        self.register_buffer("scales", scales)  # [out], the activations' dtype
        self.bias = bias

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q.contiguous(), scales.to(linear.weight.dtype), bias)

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] <= SMALL_BATCH:
            y = torch._weight_int8pack_mm(flat.contiguous(), self.weight_int8, self.scales)
            y = y.reshape(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequantized(), self.bias)


def quantize_model(model: nn.Module, method: str) -> tuple[int, int]:
    """Replaces the decoder layers' linears in place; (bytes before, bytes after)."""
    if method not in CHOICES["quantize"]:
        raise ValueError(f"--quantize {method!r}: supported: {', '.join(CHOICES['quantize'])}")
    before = after = 0
    for module in list(model.modules()):
        for name in _TARGETS:
            linear = getattr(module, name, None)
            if isinstance(linear, nn.Linear):
                q = Int8Linear.from_linear(linear)
                before += linear.weight.numel() * linear.weight.element_size()
                after += q.weight_int8.numel() + q.scales.numel() * q.scales.element_size()
                setattr(module, name, q)
    return before, after
