"""oneDNN-packed linears: bf16 ones give `F.linear`'s results bit for bit, float32 ones
(where the probe packs them) within rounding; and what gets packed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tgi_mp.executor import packed
from tgi_mp.executor.packed import PackedLinear, pack_model, packing_applies
from tgi_mp.executor.quant import Int4Linear

# oneDNN's bf16 linear needs AVX512 (BW, VL, DQ) or AVX-NE-CONVERT: on an AVX2-only CPU
# nothing is packed (tests/executor/test_model.py runs bf16 there unpacked).
needs_bf16 = pytest.mark.skipif(
    not packing_applies(torch.bfloat16, torch.device("cpu")),
    reason="this CPU has no oneDNN bf16 linear",
)


@needs_bf16
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_packed_linear_is_f_linear_bit_for_bit(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=gen).to(torch.bfloat16)
    b = torch.randn(96, generator=gen).to(torch.bfloat16)
    x = torch.randn(2, rows, 64, generator=gen).to(torch.bfloat16)
    got = PackedLinear(w, b)(x)
    assert got.shape == (2, rows, 96)
    assert torch.equal(got, F.linear(x, w, b))


@needs_bf16
def test_pack_model_packs_projections_int4_copies_and_the_head() -> None:
    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv_proj, self.o_proj = nn.Linear(32, 48), nn.Linear(32, 32)
            self.gate_up_proj, self.down_proj = nn.Linear(32, 64), nn.Linear(32, 32)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Module()
            self.model.embed_tokens = nn.Embedding(100, 32)
            self.layer = Layer()
            self.lm_head = None  # tied
            self.packed_head = None

    model = Model().to(torch.bfloat16)
    model.layer.down_proj = Int4Linear.from_linear(model.layer.down_proj)
    x = torch.randn(20, 32).to(torch.bfloat16)  # > SMALL_BATCH rows: int4's dense copy
    dense_before = model.layer.down_proj(x)
    qkv_before = model.layer.qkv_proj(x)
    assert pack_model(model) == 5
    assert isinstance(model.layer.qkv_proj, PackedLinear)
    assert torch.equal(model.layer.qkv_proj(x), qkv_before)
    assert torch.equal(model.layer.down_proj(x), dense_before)
    assert not hasattr(model.layer.down_proj, "dense")  # replaced, not kept twice
    head = model.packed_head(x)
    assert torch.equal(head, F.linear(x, model.model.embed_tokens.weight))


@needs_bf16
def test_int8_big_steps_run_a_packed_dequantized_copy() -> None:
    from tgi_mp.executor.quant import SMALL_BATCH, Int8Linear

    linear = nn.Linear(32, 48).to(torch.bfloat16)
    q = Int8Linear.from_linear(linear)
    x = torch.randn(SMALL_BATCH + 4, 32).to(torch.bfloat16)
    before = q(x)  # dequantized per call
    model = nn.Sequential(nn.Module())
    model[0].o_proj = q
    model.model = nn.Module()
    model.model.embed_tokens = nn.Embedding(10, 32).to(torch.bfloat16)
    model.lm_head = None
    pack_model(model)
    assert isinstance(q.dense_linear, PackedLinear)
    assert torch.equal(q(x), before)
    small = x[:SMALL_BATCH]
    assert torch.equal(q(small), torch._weight_int8pack_mm(small, q.weight_int8, q.scales) + q.bias)


def test_float32_packing_is_asked_for_and_close_to_f_linear(monkeypatch) -> None:
    """float32 is packed only for the executors (`float32=True`) and where the probe finds
    oneDNN faster; oneDNN's float32 GEMM then agrees with MKL's up to rounding."""
    cpu = torch.device("cpu")
    assert not packing_applies(torch.float32, cpu)  # the exact path unless asked
    monkeypatch.setattr(packed, "onednn_float32_faster", lambda: False)
    assert not packing_applies(torch.float32, cpu, float32=True)
    monkeypatch.setattr(packed, "onednn_float32_faster", lambda: True)
    assert packing_applies(torch.float32, cpu, float32=True)
    assert not packing_applies(torch.float16, cpu, float32=True)
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(300, 200, generator=gen), torch.randn(300, generator=gen)
    for rows in (1, 5, 64):
        x = torch.randn(rows, 200, generator=gen)
        got, want = PackedLinear(w, b)(x), F.linear(x, w, b)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)
