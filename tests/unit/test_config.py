"""Engine configuration: invalid combinations fail at once, with a message naming them."""

from __future__ import annotations

import pytest

from tgi_mp.config import EngineConfig
from tgi_mp.executor.runner import available_memory, kv_bytes_per_block, num_kv_blocks
from tgi_mp.model_source import load_model_config, resolve_model


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
    per_block = kv_bytes_per_block(EngineConfig(**base))
    mc = base["model_config"]
    assert per_block == 2 * mc.num_layers * 16 * mc.num_kv_heads * mc.head_dim * 4  # fp32
    blocks, why = num_kv_blocks(EngineConfig(**base, max_batch_total_tokens=1000))
    assert blocks == 63 and why == "--max-batch-total-tokens"  # rounded up to whole blocks
    blocks, _ = num_kv_blocks(EngineConfig(**base, kv_cache_memory=10 * per_block + 5))
    assert blocks == 10
    # By default: a fraction of what the machine has available now.
    blocks, why = num_kv_blocks(EngineConfig(**base, kv_cache_fraction=0.05))
    want = 0.05 * available_memory() / per_block
    assert abs(blocks - want) < 0.1 * want and "0.05 of" in why
