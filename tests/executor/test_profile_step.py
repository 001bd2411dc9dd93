"""The GPU memory profile's step runs (here on the CPU, where it is not needed for the
budget): a full prefill chunk, then logits, penalties and sampling for as many rows
as a step may sample, with top-p on its full-vocabulary path."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.executor.unpacked import float32_unpacked
from tgi_mp.config import EngineConfig
from tgi_mp.executor import sampler
from tgi_mp.executor.runner import ModelRunner
from tgi_mp.model_source import load_model_config, resolve_model

VOCAB = 4000  # wide enough that top-p's 1024-token window can fall short


def test_profile_step_takes_the_costliest_paths(tmp_path: Path, monkeypatch) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    source = resolve_model(str(path))
    cfg = EngineConfig(
        model=source,
        model_config=load_model_config(source),
        ipc_root=str(tmp_path),
        load_format="dummy",
        device="cpu",
        dtype="float32",
        max_batch_prefill_tokens=48,
        max_batch_size=20,
        max_batch_total_tokens=256,
    )
    with float32_unpacked():  # its LM head is scaled below
        runner = ModelRunner(cfg, 0)
    with torch.no_grad():  # peaked logits: at a usual temperature 1024 tokens hold top-p
        runner.model.lm_head.weight.mul_(200)
    widths: list[int] = []

    def spy(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
        vals, ids = real(logits, top_k, top_p)
        widths.append(vals.shape[1])
        return vals, ids

    real = sampler.top_candidates
    monkeypatch.setattr(sampler, "top_candidates", spy)
    runner._profile_step()
    assert widths == [VOCAB], "top-p must have sorted the whole vocabulary"
    # Penalty tables for all 20 sampled rows, grown as sequences grow them (8, 16, 32).
    assert runner.logits.history.seen.shape == (32, VOCAB) and len(runner.logits.history.free) == 32
    assert not runner.logits.history.rows
    # The profile used its own KV blocks: the engine's cache is untouched.
    assert all(not k.any() and not v.any() for k, v in runner.kv_caches)
