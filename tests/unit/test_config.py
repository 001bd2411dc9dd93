"""Engine configuration: invalid combinations fail at once, with a message naming them."""

from __future__ import annotations

import pytest

from tgi_mp.config import EngineConfig
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
    ],
)
def test_invalid(base: dict, opts: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(**base, **opts)


def test_roundtrip_through_file(base: dict, tmp_path) -> None:
    cfg = EngineConfig(**{**base, "ipc_root": str(tmp_path)}, max_batch_size=8)
    assert EngineConfig.load(cfg.save()) == cfg
