"""Tensor parallelism: N executors with 1/N of the weights give the tokens of one.

A tiny random Llama (safetensors, 4 heads, 2 KV heads, biased projections) runs
with --num-shard 1 and 2; the bundled SmolLM2 (GGUF, 9 heads, 3 KV heads) runs
the transformers oracle with --num-shard 3 (its heads do not divide by 2).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from tests.engine.oracle import compare, engine_stats, prompts, reference_greedy, tokenizer
from tests.engine.test_engine_crash import assert_killing_is_loud
from tests.executor.test_model import TINY, save_tiny
from tgi_mp.config import EngineConfig
from tgi_mp.executor.parallel import TensorParallel
from tgi_mp.executor.weights import load_model
from tgi_mp.frontend import grammar
from tgi_mp.ipc.messages import SamplingParams
from tgi_mp.launcher import Engine
from tgi_mp.model_source import load_model_config, resolve_model

GREEDY = SamplingParams(max_new_tokens=16, ignore_eos=True)
SHARDED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("tiny-tp")
    config = LlamaConfig(**{**TINY, "intermediate_size": 256}, attention_bias=True)
    save_tiny(config, directory)
    return str(directory)


def generate(
    engine: Engine, batch: list[list[int]], concurrent: bool, params: SamplingParams = GREEDY
) -> list[list[int]]:
    async def main() -> list[list[int]]:
        client = engine.client()

        async def one(p: list[int]) -> list[int]:
            return [o.token_id async for o in client.generate(p, params)]

        try:
            if concurrent:
                return await asyncio.gather(*(one(p) for p in batch))
            return [await one(p) for p in batch]
        finally:
            client.close()

    return asyncio.run(main())


def test_two_shards_give_the_tokens_of_one(tiny_dir) -> None:
    rng = np.random.default_rng(0)
    batch = [rng.integers(3, 256, n).tolist() for n in (1, 5, 17, 40, 77)]
    results = {}
    # Two shards with overlapped scheduling (rank 0 broadcasts its sampled tokens, which
    # the next plan refers to) and n-gram speculation; with neither; and with a draft
    # model (the tiny model itself, sharded too: rank 0 broadcasts each proposal).
    for n, overlap, spec in ((1, True, ""), (2, True, "ngram"), (2, False, ""), (2, True, "draft")):
        with Engine.start(
            tiny_dir,
            dtype="float32",
            num_shards=n,
            max_batch_total_tokens=2048,
            overlap_scheduling=overlap,
            speculate=4 if spec else 0,
            speculate_max_batch=8,
            speculative_model=tiny_dir if spec == "draft" else None,
        ) as engine:
            results[n, overlap, spec] = (
                generate(engine, batch, False),
                generate(engine, batch, True),
            )
            stats = asyncio.run(engine_stats(engine)) if spec == "draft" else None
    assert results[1, True, ""][0] == results[1, True, ""][1]
    for key in ((2, True, "ngram"), (2, False, ""), (2, True, "draft")):
        assert results[key] == results[1, True, ""], key
    assert stats is not None and stats.spec_accepted_tokens > 0.9 * stats.spec_proposed_tokens > 0


def rank_params(source, cfg, n: int) -> list[dict[str, torch.Tensor]]:
    """Each of n ranks' parameters, loaded as that rank loads them."""
    return [
        dict(
            load_model(
                source, cfg, torch.float32, "cpu", tp=TensorParallel(r, n)
            ).named_parameters()
        )
        for r in range(n)
    ]


def test_ranks_load_their_slices_only(tiny_dir) -> None:
    source = resolve_model(tiny_dir)
    cfg = load_model_config(source)
    full = dict(load_model(source, cfg, torch.float32, "cpu").named_parameters())
    ranks = rank_params(source, cfg, 2)

    def size(params: dict, sharded: bool) -> int:
        return sum(
            p.numel() * p.element_size()
            for name, p in params.items()
            if (name.split(".")[-2] in SHARDED) == sharded
        )

    for r, params in enumerate(ranks):
        print(
            f"rank {r}: sharded weights {size(params, True)} of {size(full, True)} bytes, "
            f"replicated {size(params, False)} bytes"
        )
        assert size(params, True) * 2 == size(full, True) + (
            # o_proj's bias is whole on every rank (rank 0's counts; the others hold zeros)
            full["model.layers.0.self_attn.o_proj.bias"].numel() * 4 * cfg.num_layers
        )
        assert size(params, False) == size(full, False)
    # The slices put back together are the whole weights.
    layer = "model.layers.1."
    q = cfg.num_heads * cfg.head_dim // 2
    kv = cfg.num_kv_heads * cfg.head_dim // 2
    qkv = [p[layer + "self_attn.qkv_proj.weight"] for p in ranks]
    want = full[layer + "self_attn.qkv_proj.weight"]
    h = cfg.num_heads * cfg.head_dim
    k = cfg.num_kv_heads * cfg.head_dim
    assert torch.equal(torch.cat([w[:q] for w in qkv]), want[:h])
    assert torch.equal(torch.cat([w[q : q + kv] for w in qkv]), want[h : h + k])
    down = [p[layer + "mlp.down_proj.weight"] for p in ranks]
    assert torch.equal(torch.cat(down, dim=1), full[layer + "mlp.down_proj.weight"])
    assert torch.equal(ranks[1][layer + "self_attn.o_proj.bias"], torch.zeros(cfg.hidden_size))


def test_gguf_slices(tmp_path) -> None:
    source = resolve_model(None)
    cfg = load_model_config(source)
    full = dict(load_model(source, cfg, torch.float32, "cpu").named_parameters())
    ranks = rank_params(source, cfg, 3)
    layer = "model.layers.3."
    q = cfg.num_heads * cfg.head_dim
    qs = [p[layer + "self_attn.qkv_proj.weight"][: q // 3] for p in ranks]
    assert torch.equal(torch.cat(qs), full[layer + "self_attn.qkv_proj.weight"][:q])
    o = [p[layer + "self_attn.o_proj.weight"] for p in ranks]
    assert torch.equal(torch.cat(o, dim=1), full[layer + "self_attn.o_proj.weight"])
    gate_up = [p[layer + "mlp.gate_up_proj.weight"] for p in ranks]
    inter = cfg.intermediate_size // 3
    gates = torch.cat([w[:inter] for w in gate_up])
    assert torch.equal(gates, full[layer + "mlp.gate_up_proj.weight"][: cfg.intermediate_size])


def test_three_shards_match_transformers() -> None:
    ps = prompts()[:6]  # up to 257 tokens
    digits = grammar.from_tgi({"type": "regex", "value": "[0-9]{5}"})
    with Engine.start(None, dtype="float32", num_shards=3, max_batch_total_tokens=4096) as engine:
        got = generate(engine, ps, concurrent=True)
        # Every rank reads the grammar mask that follows a plan (rank 0 applies it).
        constrained = generate(
            engine, ps[2:3], True, SamplingParams(max_new_tokens=8, grammar=digits)
        )
    for p, g, (want, margins) in zip(ps, got, reference_greedy(ps), strict=True):
        ok, n = compare(g, want[:16], margins[:16])
        assert ok, f"prompt of {len(p)} tokens diverges at {n}: {g} vs {want[:16]}"
    text = tokenizer().decode(constrained[0], skip_special_tokens=True)
    assert len(text) == 5 and text.isdigit(), constrained


def test_shard_count_must_divide_the_heads() -> None:
    source = resolve_model(None)
    with pytest.raises(ValueError, match="9 attention heads, 3 KV heads") as e:
        EngineConfig(source, load_model_config(source), "/tmp", num_shards=2)
    assert "--num-shard 2" in str(e.value)


def test_killing_one_rank_takes_the_engine_down(tiny_dir) -> None:
    assert_killing_is_loud(
        Engine.start(tiny_dir, num_shards=2, max_batch_total_tokens=8192), "executor1"
    )


def test_dummy_weights_serve_from_a_config_alone(tmp_path) -> None:
    LlamaConfig(**TINY).to_json_file(str(tmp_path / "config.json"))
    batch = [[5, 6, 7], [9] * 20]
    with Engine.start(
        str(tmp_path / "config.json"),
        load_format="dummy",
        num_shards=2,
        max_batch_total_tokens=1024,
    ) as engine:
        first = generate(engine, batch, concurrent=True)
        assert generate(engine, batch, concurrent=False) == first
    assert [len(t) for t in first] == [16, 16]
