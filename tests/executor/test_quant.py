"""Weight-only int8: the quantized GEMM against the dequantized float GEMM, and a model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tgi_mp.executor import quant
from tgi_mp.executor.quant import Int8Linear, quantize_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, quant.SMALL_BATCH, quant.SMALL_BATCH + 1, 64])
def test_int8_gemm_is_the_dequantized_gemm(dtype: torch.dtype, rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    linear = nn.Linear(96, 80, bias=True).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(80, 96, generator=gen))
    q = Int8Linear.from_linear(linear)
    x = torch.randn(rows, 96, generator=gen).to(dtype)
    want = x.float() @ q.dequantized().float().t() + linear.bias.float()
    got = q(x).float()
    # Both kernels accumulate in float32; bf16 outputs round to 8 bits of mantissa.
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=0)
    # ...and the int8 weights are the float ones to within half a step of each row's scale
    # (a whole step in bf16, where the scale and the product are rounded to 8 bits too).
    step = q.scales.float()[:, None] * (0.5 if dtype == torch.float32 else 1.0)
    assert ((q.dequantized().float() - linear.weight.float()).abs() <= step + 1e-6).all()


def test_quantize_model_replaces_the_decoder_linears_only() -> None:
    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv_proj, self.o_proj = nn.Linear(8, 24), nn.Linear(8, 8)
            self.gate_up_proj, self.down_proj = nn.Linear(8, 32), nn.Linear(16, 8)

    model = nn.Sequential(Layer(), Layer())
    model.lm_head = nn.Linear(8, 50)
    before, after = quantize_model(model, "int8")
    assert all(isinstance(layer.qkv_proj, Int8Linear) for layer in model[:2])
    assert isinstance(model.lm_head, nn.Linear)  # the LM head keeps its dtype
    weights, rows = 8 * 24 + 8 * 8 + 8 * 32 + 16 * 8, 24 + 8 + 32 + 8
    assert before == 2 * 4 * weights and after == 2 * (weights + 4 * rows)  # int8 + fp32 scales
    with pytest.raises(ValueError, match="supported: int8"):
        quantize_model(model, "gptq")
