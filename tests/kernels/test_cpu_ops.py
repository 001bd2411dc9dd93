"""The fused bf16 layer ops (`kernels/cpu_ops.cpp`) against the torch ops they replace."""

from __future__ import annotations

import pytest
import torch

from tgi_mp.executor.models.llama import TORCH_OPS, RMSNorm
from tgi_mp.kernels.cpu_ops import FusedLayerOps

BF16_ULP = 2**-7  # relative spacing of bf16 values: one rounding step apart at most


@pytest.fixture(scope="module", params=[False, True], ids=["portable", "avx512"])
def fused(request) -> FusedLayerOps:
    ops = FusedLayerOps(fast=request.param)
    if request.param and not ops.fast:
        pytest.skip("this CPU has no AVX-512")
    return ops


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


@pytest.mark.parametrize("rows", [1, 37])
def test_add_rms_norm(fused, rows) -> None:
    norm = RMSNorm(576, 1e-5).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(_randn(576, seed=3))
    hidden, delta = 4 * _randn(rows, 576), _randn(rows, 2 * 576, seed=1)[:, :576]  # strided
    want_h, want = TORCH_OPS.add_rms_norm(hidden.clone(), delta, norm)
    got_h, got = fused.add_rms_norm(hidden, delta, norm)
    assert torch.equal(got_h, want_h) and got_h.data_ptr() == hidden.data_ptr()  # in place
    # One float32 sum in another order: at most a rounding step apart.
    torch.testing.assert_close(got, want, rtol=BF16_ULP, atol=1e-6)
    _, alone = fused.add_rms_norm(hidden, None, norm)
    torch.testing.assert_close(alone, norm(hidden), rtol=BF16_ULP, atol=1e-6)


def test_silu_mul(fused) -> None:
    gate_up = 3 * _randn(19, 2 * 1536)
    got, want = fused.silu_mul(gate_up), TORCH_OPS.silu_mul(gate_up)
    torch.testing.assert_close(got, want, rtol=BF16_ULP, atol=1e-6)
    assert (got == want).float().mean() > 0.99  # only exp's last float bit may differ


def test_rope_in_place_on_the_projection(fused) -> None:
    t, heads, kv_heads, dim = 11, 9, 3, 64
    qkv = _randn(t, (heads + 2 * kv_heads) * dim)
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k = q.view(t, heads, dim), k.view(t, kv_heads, dim)
    freqs = torch.arange(t).float()[:, None] * torch.rand(dim // 2)[None]
    cos, sin = freqs.cos().bfloat16()[:, None], freqs.sin().bfloat16()[:, None]
    want_q, want_k = TORCH_OPS.rope(q, k, cos, sin)
    got_q, got_k = fused.rope(q, k, cos, sin)
    assert got_q.data_ptr() == qkv.data_ptr()  # rotated inside qkv
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)  # torch's roundings
