"""Linears with their weights reordered once for oneDNN, on the CPU.

bf16: `F.linear` on a bf16 CPU tensor reorders the weight into oneDNN's blocked layout
on every call; `mkldnn._reorder_linear_weight` does it once at load and
`mkldnn._linear_pointwise` runs on the result (what inductor's freezing pass emits).
Same kernel, same results bit for bit, minus the per-call reorder: measured on 2
AVX512-BF16 cores (`perf/bench_linears.py`, perf/RESULTS.md), SmolLM2's 30 layers
of projections take 8.2 instead of 9.6 ms at 1 row and 13.4 instead of 16.6 at 32;
its LM head 1.05 vs 1.75 ms and 2.87 vs 3.59.

float32: `F.linear` runs MKL's sgemm, which on some CPUs takes a generic path (on 2
AMD EPYC cores: 5 GFLOP/s from 2 to 32 rows, as if each row read the weights
again), where oneDNN's kernel is 2-4x faster. It rounds differently (a few 1e-6
relative), so float32 is packed only where a probe at start measures oneDNN clearly
faster; elsewhere float32 stays MKL's, as transformers runs it.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn

from tgi_mp.executor.quant import TARGETS, Int4Linear, Int8Linear


def packing_applies(dtype: torch.dtype, device: torch.device, float32: bool = False) -> bool:
    """bf16 linears are packed wherever oneDNN runs them; float32 ones only when asked
    (`float32`: the executors ask, tests of the exact path do not) and faster here."""
    if device.type != "cpu":
        return False
    if dtype == torch.bfloat16:
        return _onednn_bf16()
    return float32 and dtype == torch.float32 and onednn_float32_faster()


# oneDNN's float32 GEMM must beat MKL's by this factor on the probe to be used.
_FLOAT32_GAIN = 1.5


@functools.cache
def onednn_float32_faster() -> bool:
    """Whether oneDNN's float32 linear is clearly faster here than `F.linear` (MKL), on
    a decode-sized product (8 rows of a 2048 x 2048 weight), best of a few runs."""
    if not torch.backends.mkldnn.is_available():
        return False
    weight, x = torch.randn(2048, 2048), torch.randn(8, 2048)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    mkl = best(lambda: torch.nn.functional.linear(x, weight))
    onednn = best(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
    return onednn * _FLOAT32_GAIN < mkl


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
