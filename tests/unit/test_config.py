"""Engine configuration: invalid combinations fail at once, with a message naming them."""

from __future__ import annotations

import msgspec
import pytest
import torch

from tgi_mp.config import EngineConfig
from tgi_mp.executor.device import available_host_memory, cuda_kv_budget
from tgi_mp.executor.runner import host_kv_budget, kv_bytes_per_block, num_kv_blocks
from tgi_mp.model_source import load_model_config, resolve_model
from tgi_mp.options import parse_cuda_graphs


@pytest.fixture(scope="module")
def base() -> dict:
    src = resolve_model(None)
    return {"model": src, "model_config": load_model_config(src), "ipc_root": "/tmp"}


def test_defaults_are_valid(base: dict) -> None:
    cfg = EngineConfig(**base)
    assert cfg.max_batch_size is None and cfg.block_size == 16


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"block_size": 0}, "block_size must be at least 1"),
        ({"max_batch_size": 0}, "max_batch_size must be at least 1"),
        ({"num_shards": -1}, "num_shards must be at least 1"),
        ({"max_batch_size": 65, "max_batch_prefill_tokens": 64}, r"max_batch_size \(65\)"),
        ({"dtype": "int8"}, "dtype must be"),
        ({"device": "tpu"}, "device must be one of auto, cpu, cuda"),
        ({"load_format": "pt"}, "load_format must be one of auto, dummy"),
        ({"attention": "xformers"}, "attention must be"),
        ({"cuda_memory_fraction": 1.5}, "cuda_memory_fraction must be in"),
        ({"cuda_graphs": (0, 4)}, "cuda_graphs batch sizes must be positive"),
        ({"kv_cache_fraction": 0}, "kv_cache_fraction must be in"),
        ({"watermark_gamma": 1.0}, "watermark_gamma must be in"),
    ],
)
def test_invalid(base: dict, opts: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(**base, **opts)


def test_roundtrip_through_file(base: dict, tmp_path) -> None:
    cfg = EngineConfig(**{**base, "ipc_root": str(tmp_path)}, max_batch_size=8)
    assert EngineConfig.load(cfg.save()) == cfg


def test_kv_capacity_from_tokens_bytes_or_available_memory(base: dict) -> None:
    per_block = kv_bytes_per_block(EngineConfig(**base), torch.float32)
    mc = base["model_config"]
    assert per_block == 2 * mc.num_layers * 16 * mc.num_kv_heads * mc.head_dim * 4  # fp32
    assert kv_bytes_per_block(EngineConfig(**base), torch.bfloat16) == per_block // 2

    def never() -> tuple[int, str]:
        raise AssertionError("an explicit capacity needs no measurement")

    blocks, why = num_kv_blocks(EngineConfig(**base, max_batch_total_tokens=1000), 1, never)
    assert blocks == 63 and why == "--max-batch-total-tokens"  # rounded up to whole blocks
    blocks, _ = num_kv_blocks(
        EngineConfig(**base, kv_cache_memory=10 * per_block + 5), per_block, never
    )
    assert blocks == 10
    # By default on the CPU: a fraction of what the machine has available now.
    cfg = EngineConfig(**base, kv_cache_fraction=0.05)
    blocks, why = num_kv_blocks(cfg, per_block, lambda: host_kv_budget(cfg))
    want = 0.05 * available_host_memory() / per_block
    assert abs(blocks - want) < 0.1 * want and "0.05 of" in why


def test_no_room_for_one_block_is_an_error(base: dict) -> None:
    with pytest.raises(RuntimeError, match="no memory left for the KV cache"):
        num_kv_blocks(EngineConfig(**base), 4096, lambda: (4095, "a test"))


def test_cuda_kv_budget_leaves_others_peak_and_graphs() -> None:
    gib = 2**30
    # 80 GiB GPU, 2 GiB used by another process, torch holds 20 GiB, peaked at 18 GiB.
    total, free, reserved, peak = 80 * gib, 58 * gib, 20 * gib, 18 * gib
    budget = cuda_kv_budget(total, free, reserved, peak, 0.9, gib // 2)
    assert budget == int(80 * gib * 0.9) - 2 * gib - 18 * gib - gib // 2
    # Nothing left: zero, never negative (the runner then keeps one block and says why).
    assert cuda_kv_budget(total, free, reserved, 79 * gib, 0.9, 0) == 0


@pytest.mark.parametrize(
    ("spec", "want"),
    [("1,2,4,8", (1, 2, 4, 8)), ("0", ()), ("", ()), (" 8, 1,8", (1, 8))],
)
def test_cuda_graph_buckets(spec: str, want: tuple[int, ...]) -> None:
    assert parse_cuda_graphs(spec) == want


@pytest.mark.parametrize("spec", ["1,x", "-4"])
def test_cuda_graph_buckets_invalid(spec: str) -> None:
    with pytest.raises(ValueError, match="--cuda-graphs"):
        parse_cuda_graphs(spec)


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "want"),
    [(True, True, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")],
)
def test_auto_dtype_follows_the_cpus_native_bf16(monkeypatch, amx, avx512_bf16, want) -> None:
    from tgi_mp.executor import device

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    dtype, why = device.resolve_dtype("auto", torch.device("cpu"))
    assert str(dtype) == f"torch.{want}"
    assert ("AMX" if amx else "AVX512_BF16" if avx512_bf16 else "no native bf16") in why
    assert device.resolve_dtype("float32", torch.device("cpu")) == (torch.float32, "--dtype")


def test_draft_model_must_share_the_vocabulary_and_speculate(base: dict, tmp_path) -> None:
    mc = base["model_config"]
    draft = {"draft_model": base["model"], "draft_model_config": mc}
    with pytest.raises(ValueError, match="needs --speculate N"):
        EngineConfig(**base, **draft)
    other = msgspec.structs.replace(mc, vocab_size=mc.vocab_size + 1)
    with pytest.raises(ValueError, match="must share the target's tokenizer"):
        EngineConfig(**base, speculate=2, draft_model=base["model"], draft_model_config=other)
    short = msgspec.structs.replace(mc, max_position_embeddings=mc.max_position_embeddings // 2)
    with pytest.raises(ValueError, match="shorter than the target's"):
        EngineConfig(**base, speculate=2, draft_model=base["model"], draft_model_config=short)
    cfg = EngineConfig(**base, speculate=2, **draft)
    # Each block holds the draft's K/V too: the same model twice, twice the bytes.
    plain = kv_bytes_per_block(EngineConfig(**base), torch.float32)
    assert kv_bytes_per_block(cfg, torch.float32) == 2 * plain
    saved = EngineConfig(**{**base, "ipc_root": str(tmp_path)}, speculate=2, **draft)
    assert EngineConfig.load(saved.save()) == saved
