"""The C++ CPU attention kernel against the torch reference: both of its paths, the
shapes models have (GQA ratios, head dims, block sizes), its build cache and refusals."""

from __future__ import annotations

import pytest
import torch

from tgi_mp.kernels import attention as reference
from tgi_mp.kernels import cpu_attention, cpu_build
from tgi_mp.kernels.attention import AttentionMetadata
from tgi_mp.kernels.backends import BackendUnavailable, select_backend

CPU = torch.device("cpu")
FAST = cpu_attention.fast_path_available()
PATHS = [
    pytest.param(False, id="portable"),
    pytest.param(
        True, id="avx512-bf16", marks=pytest.mark.skipif(not FAST, reason="no AVX512_BF16 here")
    ),
]


def _step(query_lens, context_lens, block_size, heads, kv_heads, dim, seed=0):
    """A step over randomly placed blocks; table entries past a sequence's blocks are -1
    (the kernel must never read them), q a strided view as the model passes it."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-(q + c) // block_size) for q, c in zip(query_lens, context_lens, strict=True)]
    perm = torch.randperm(sum(need) + 2, generator=gen).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(perm[at : at + n] + [-1] * (max(need) - n))
        at += n
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_size, CPU)
    shape = (sum(need) + 2, block_size, kv_heads, dim)
    k_cache = torch.randn(shape, generator=gen).bfloat16()
    v_cache = torch.randn(shape, generator=gen).bfloat16()
    # Scores of a few units, as trained models have: a softmax far from uniform.
    qkv = 2 * torch.randn(sum(query_lens), heads + 2 * kv_heads, dim, generator=gen)
    q = qkv.bfloat16()[:, :heads]
    return q, k_cache, v_cache, meta


def _error(fast: bool, q, k_cache, v_cache, meta) -> float:
    scale = q.shape[-1] ** -0.5
    want = reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, scale)
    got = cpu_attention.paged_attention(
        q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale, fast
    )
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    return (got.float() - want).abs().max().item()


@pytest.mark.parametrize("fast", PATHS)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"),
    # The last: a head dim the fast path does not take, so the portable path runs.
    [(9, 3, 64, 16), (8, 8, 128, 7), (32, 4, 64, 32), (64, 1, 32, 16), (4, 2, 16, 16)],
)
def test_mixed_steps_match_the_reference(fast, heads, kv_heads, dim, block_size) -> None:
    # A cached prefix with a chunk, a fresh prompt longer than a key tile, decode rows at
    # block boundaries and one with a long context.
    query_lens = [7, 1, 45, 1, 1, 1]
    context_lens = [19, 0, 0, block_size - 1, block_size, 150]
    step = _step(query_lens, context_lens, block_size, heads, kv_heads, dim)
    # Outputs are bf16 (~0.008 apart near 1) from bf16 probabilities.
    assert _error(fast, *step) < 2e-2


@pytest.mark.parametrize(
    ("heads", "kv_heads"), [(9, 3), (32, 4), (8, 8)], ids=["gqa3", "gqa8", "mha"]
)
@pytest.mark.skipif(not FAST, reason="no AVX512_BF16 here")
def test_decode_rows_grouped_by_sequence_equal_rows_alone(heads, kv_heads) -> None:
    # Enough decode rows for the kernel to take every KV head of a sequence in one item
    # (its grouped walk); the first row alone is taken one KV head at a time. Both must
    # match the reference, and each other bit for bit.
    context_lens = [150, 15, 16, 17, 300, 1, 40, 63, 64, 65, 99, 200]
    step = _step([1] * len(context_lens), context_lens, 16, heads, kv_heads, 64, seed=2)
    assert _error(True, *step) < 2e-2
    q, k_cache, v_cache, meta = step
    scale = q.shape[-1] ** -0.5
    both = cpu_attention.paged_attention(
        q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale, True
    )
    alone = cpu_attention.paged_attention(
        q[:1], k_cache, v_cache, meta.query_start_loc[:2], meta.seq_lens[:1],
        meta.block_tables[:1], scale, True,
    )  # fmt: skip
    assert torch.equal(both[:1], alone)


@pytest.mark.parametrize("fast", PATHS)
def test_a_long_prefill_chunk_over_a_long_context(fast) -> None:
    step = _step([256], [700], 16, 9, 3, 64, seed=1)
    assert _error(fast, *step) < 2e-2


def test_the_kernel_refuses_what_it_cannot_take() -> None:
    q, k_cache, v_cache, meta = _step([3], [0], 16, 9, 3, 64)
    args = (meta.query_start_loc, meta.seq_lens, meta.block_tables, 0.125, False)
    with pytest.raises(cpu_attention.KernelUnavailable, match="takes bfloat16"):
        cpu_attention.paged_attention(q.float(), k_cache.float(), v_cache.float(), *args)
    odd = _step([3], [0], 16, 9, 3, 63)
    with pytest.raises(cpu_attention.KernelUnavailable, match="head_dim=63"):
        cpu_attention.paged_attention(*odd[:3], *args)


def test_built_once_per_source_into_the_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TGI_MP_KERNEL_CACHE", str(tmp_path))
    built = cpu_build.build("cpu_attention")
    assert built.parent == tmp_path and built.stat().st_size > 0
    stamp = built.stat().st_mtime_ns
    assert cpu_build.build("cpu_attention") == built and built.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [built.name]  # no temporary left


def test_auto_picks_the_kernel_for_bf16_and_falls_back_with_the_reason(monkeypatch) -> None:
    backend, why = select_backend("auto", CPU, torch.bfloat16, 16)
    if FAST:
        assert backend.name == "cpu" and "self-check max error" in why
    else:
        assert backend.name == "torch" and "no AVX512_BF16" in why
    backend, why = select_backend("auto", CPU, torch.float32, 16)
    assert backend.name == "torch" and "takes bfloat16, not float32" in why
    if FAST:  # a model whose heads the fast path does not take keeps the reference
        backend, why = select_backend("auto", CPU, torch.bfloat16, 16, (4, 2, 16))
        assert backend.name == "torch" and "head dim divisible by 32" in why
    # No compiler: auto says why and uses the reference; asking for it is an error.
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("TGI_MP_KERNEL_CACHE", "/nonexistent/empty")
    monkeypatch.setattr(cpu_build, "library", cpu_build.library.__wrapped__)
    monkeypatch.setattr(cpu_attention, "library", cpu_attention.library.__wrapped__)
    if FAST:
        backend, why = select_backend("auto", CPU, torch.bfloat16, 16)
        assert backend.name == "torch" and "no C++ compiler (no-such-compiler)" in why
    with pytest.raises(BackendUnavailable, match=r"--attention cpu: .*no C\+\+ compiler"):
        select_backend("cpu", CPU, torch.bfloat16, 16)
