"""Weight-only int8 / int4: the quantized GEMMs against dequantized float GEMMs, the
GGUF 4-bit mapping, and what `quantize_model` replaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tgi_mp.executor import quant
from tgi_mp.executor.quant import GroupQuantized, Int4Linear, Int8Linear, quantize_model


def _linear_and_input(
    in_features: int, out_features: int, rows: int, dtype: torch.dtype
) -> tuple[nn.Linear, torch.Tensor]:
    """A linear with N(0, 1) weights and a bias, and `rows` inputs for it, seeded by rows."""
    gen = torch.Generator().manual_seed(rows)
    linear = nn.Linear(in_features, out_features, bias=True).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen))
    return linear, torch.randn(rows, in_features, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, quant.SMALL_BATCH, quant.SMALL_BATCH + 1, 64])
def test_int8_gemm_is_the_dequantized_gemm(dtype: torch.dtype, rows: int) -> None:
    linear, x = _linear_and_input(96, 80, rows, dtype)
    q = Int8Linear.from_linear(linear)
    want = x.float() @ q.dequantized().float().t() + linear.bias.float()
    got = q(x).float()
    # Both kernels accumulate in float32; the int8 one takes bf16 inputs (float32 ones
    # are rounded to bf16 for it) and bf16 outputs round to 8 bits of mantissa.
    tol = 1e-4 if dtype == torch.float32 and rows > quant.SMALL_BATCH else 2e-2
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
    assert before == 2 * 4 * weights and after == 2 * (weights + 2 * rows)  # int8 + bf16 scales
    with pytest.raises(ValueError, match="supported: int8, int4, gguf"):
        quantize_model(model, "gptq")


# ----------------------------------------------------------------------------- int4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, quant.SMALL_BATCH, quant.SMALL_BATCH + 1, 64])
def test_int4_gemm_is_the_dequantized_gemm(dtype: torch.dtype, rows: int) -> None:
    linear, x = _linear_and_input(128, 48, rows, dtype)
    q = Int4Linear.from_linear(linear)
    # The small-batch kernel holds scale and zero in bf16: its weights are these.
    sz = q.scale_zeros.float()
    codes = GroupQuantized.from_float(linear.weight).codes.float().view(48, 4, 32)
    packed_weight = (codes - 8) * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]
    weight = q.dense.float() if rows > quant.SMALL_BATCH else packed_weight.view(48, 128)
    want = x.float() @ weight.t() + linear.bias.float()
    got = q(x)
    assert got.dtype == dtype and got.shape == (rows, 48)
    # float32 accumulation inside; bf16 activations (the kernel's) round to 8 bits.
    tol = 1e-4 if dtype == torch.float32 and rows > quant.SMALL_BATCH else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol * want.abs().max().item(), rtol=0)


def test_int4_from_float_is_within_half_a_step() -> None:
    w = torch.randn(32, 96, generator=torch.Generator().manual_seed(0))
    q = GroupQuantized.from_float(w)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) == 15 and int(q.codes.min()) == 0
    step = q.scales.repeat_interleave(32, dim=1)
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_4bit_blocks_map_exactly(kind: str) -> None:
    """A GGUF's Q4_0 / Q4_1 blocks read as codes, scales and zeros: the same values as
    gguf's own dequantisation."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    qtype = GGMLQuantizationType[kind]
    w = np.random.default_rng(0).standard_normal((32, 128)).astype(np.float32)
    blocks = quantize(w, qtype)
    q = GroupQuantized.from_gguf(blocks, kind, (32, 128))
    torch.testing.assert_close(
        q.dequantize(), torch.from_numpy(dequantize(blocks, qtype)), rtol=0, atol=1e-6
    )


def _model() -> nn.Module:
    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv_proj, self.o_proj = nn.Linear(32, 48), nn.Linear(32, 32)
            self.gate_up_proj, self.down_proj = nn.Linear(32, 64), nn.Linear(32, 32)

    return nn.Sequential(Layer())


@pytest.mark.parametrize("method", ["int4", "gguf"])
def test_shipped_shards_are_packed_as_they_are_and_the_rest_per_method(method: str) -> None:
    """A projection all of whose shards the checkpoint shipped in 4 bits is packed from
    them; one with a float shard gets the shipped ones written back as floats, then is
    quantized (int4) or kept dense (gguf)."""
    model = _model()
    gen = torch.Generator().manual_seed(1)
    qkv = [GroupQuantized.from_float(torch.randn(16, 32, generator=gen)) for _ in range(3)]
    gate = GroupQuantized.from_float(torch.randn(32, 32, generator=gen))
    shipped = {"0.qkv_proj": qkv, "0.gate_up_proj": [gate, None]}
    refilled = []

    def refill(path: str, shard: int, rows: torch.Tensor) -> None:
        refilled.append((path, shard))
        model[0].gate_up_proj.weight.data[:32] = rows

    quantize_model(model, method, shipped, refill)
    layer = model[0]
    assert isinstance(layer.qkv_proj, Int4Linear)
    assert torch.equal(layer.qkv_proj.dense, torch.cat([q.dequantize() for q in qkv]))
    assert refilled == [("0.gate_up_proj", 0)]
    if method == "int4":
        assert isinstance(layer.gate_up_proj, Int4Linear) and isinstance(layer.o_proj, Int4Linear)
        got = layer.gate_up_proj.dense[:32]
        step = gate.scales.repeat_interleave(32, dim=1).max()
        assert (got - gate.dequantize()).abs().max() <= step  # requantized, not shipped
    else:
        assert isinstance(layer.gate_up_proj, nn.Linear) and isinstance(layer.o_proj, nn.Linear)
        assert torch.equal(layer.gate_up_proj.weight[:32], gate.dequantize())


def test_int4_leaves_shapes_it_cannot_pack_dense() -> None:
    model = nn.Sequential(nn.Module())
    model[0].o_proj = nn.Linear(32, 40)  # 40 output rows: not a multiple of 16
    quantize_model(model, "int4")
    assert isinstance(model[0].o_proj, nn.Linear)


def test_quantizing_a_model_without_float_projections_is_an_error() -> None:
    model = _model()
    quantize_model(model, "int4")
    with pytest.raises(ValueError, match="no float decoder projections left"):
        quantize_model(model, "int4")  # already quantized (or packed): nothing would change
