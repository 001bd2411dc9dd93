"""`--lora-adapters` parsing and the start-up checks of an adapter directory."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tgi_mp.launcher import Engine
from tgi_mp.lora_source import AdapterError, check_adapter, parse_adapters, resolve_adapters
from tgi_mp.model_source import ModelConfig

MC = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    rope_scaling=None,
    max_position_embeddings=128,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_ids=[2],
)
PREFIX = "base_model.model.model.layers"


def write(directory: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, **(config or {})}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    if tensors is None:
        tensors = {
            f"{PREFIX}.{i}.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64) for i in range(2)
        } | {f"{PREFIX}.{i}.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4) for i in range(2)}
    save_file(tensors, directory / "adapter_model.safetensors")
    return directory


def test_parse_adapters() -> None:
    assert parse_adapters("a=/x/y, org/lora ,") == (("a", "/x/y"), ("org/lora", "org/lora"))
    assert parse_adapters("org/lora@v2") == (("org/lora", "org/lora@v2"),)
    assert parse_adapters(None) == ()
    with pytest.raises(ValueError, match="given twice"):
        parse_adapters("a=/x,a=/y")
    with pytest.raises(ValueError, match="not `name=path`"):
        parse_adapters("=/x")


def test_a_good_adapter_and_its_scale(tmp_path: Path) -> None:
    spec = check_adapter("q", write(tmp_path / "q"), MC, None)
    assert (spec.rank, spec.scale, spec.modules) == (4, 2.0, ("q_proj",))
    rs = check_adapter("rs", write(tmp_path / "rs", {"use_rslora": True}), MC, None)
    assert rs.scale == pytest.approx(8 / math.sqrt(4))


def bad_cases(d: Path) -> list[tuple[str, Path, int | None]]:
    ab = {f"{PREFIX}.0.mlp.down_proj.lora_A.weight": torch.zeros(4, 128)}
    return [
        ("adapter_config.json is missing", d / "none", None),
        ("only LORA adapters", write(d / "ia3", {"peft_type": "IA3"}), None),
        ("DoRA", write(d / "dora", {"use_dora": True}), None),
        ("rank 4 is above --max-lora-rank 2", write(d / "rank"), 2),
        (
            "expected [4, 64]",  # an adapter made for a wider model
            write(
                d / "shape",
                tensors={f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 96)},
            ),
            None,
        ),
        (
            "not a LoRA A/B weight",
            write(
                d / "head", tensors={"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}
            ),
            None,
        ),
        (
            "layer 7; the model has 2",
            write(
                d / "layer", tensors={f"{PREFIX}.7.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)}
            ),
            None,
        ),
        ("A without B", write(d / "half", tensors=ab), None),
    ]


def test_bad_adapters_are_refused_naming_the_file(tmp_path: Path) -> None:
    for message, directory, max_rank in bad_cases(tmp_path):
        with pytest.raises(AdapterError, match=re.escape(message)) as e:
            check_adapter("x", directory, MC, max_rank)
        assert str(directory) in str(e.value) or "'x'" in str(e.value)
    corrupt = write(tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(AdapterError, match="not a safetensors file"):
        check_adapter("x", corrupt, MC, None)
    (corrupt / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="is not JSON"):
        check_adapter("x", corrupt, MC, None)


def test_engine_start_refuses_a_bad_adapter_before_starting_anything(tmp_path: Path) -> None:
    """The launcher checks adapters first: a clear error, no process, no runtime dir."""
    root = tempfile.gettempdir()
    before = set(glob.glob(os.path.join(root, "tgi-mp-*")))
    bad = write(
        tmp_path / "bad", tensors={f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 7)}
    )
    with pytest.raises(AdapterError, match="another base model"):
        Engine.start(None, lora_adapters=f"bad={bad}")
    assert set(glob.glob(os.path.join(root, "tgi-mp-*"))) == before


def test_an_adapter_by_hub_id_from_the_local_cache(tmp_path: Path, monkeypatch) -> None:
    """`org/name` (and `@revision`) found in the HF cache layout, never downloaded."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--lora"
    commit = "0123456789abcdef0123456789abcdef01234567"
    write(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "refs" / "v2").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for ref in ("org/lora", "org/lora@v2"):
        (spec,) = resolve_adapters(parse_adapters(ref), MC, None)
        assert (spec.name, spec.path) == ("org/lora", str(repo / "snapshots" / commit))
    with pytest.raises(AdapterError, match="nor in the local Hugging Face cache"):
        resolve_adapters(parse_adapters("org/missing"), MC, None)
