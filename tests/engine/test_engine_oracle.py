"""The correctness oracle: the engine's greedy tokens are transformers' greedy tokens.

The bundled SmolLM2 in float32, prompts of 1 to 640 tokens, 24 new tokens each,
run (a) one at a time, (b) all at once, each prompt now whole in the prefix
cache, (c) with 64-token prefill chunks and the prefix cache off, and (d) in a KV
cache small enough to force preemption and evictions (with speculative decoding
on), then again on what the cache kept. Also: grammar-constrained rows beside
free ones leave the free ones' tokens unchanged.
"""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest
from tokenizers import Tokenizer

from tests.engine.oracle import NEW_TOKENS, compare, engine_stats, prompts, reference_greedy
from tgi_mp.frontend import grammar
from tgi_mp.ipc.messages import SamplingParams
from tgi_mp.launcher import Engine
from tgi_mp.model_source import default_gguf_path, resolve_model
from tgi_mp.tokenizer_export import export_tokenizer

GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def cases() -> list[tuple[list[int], list[int], list[float]]]:
    ps = prompts()
    return [(p, toks, margins) for p, (toks, margins) in zip(ps, reference_greedy(ps), strict=True)]


async def _generate(client, prompt: list[int]) -> list[int]:
    return [o.token_id async for o in client.generate(prompt, GREEDY)]


def _check(label: str, cases, outputs: list[list[int]]) -> None:
    near_ties = 0
    for (prompt, want, margins), got in zip(cases, outputs, strict=True):
        assert len(got) == NEW_TOKENS
        ok, n = compare(got, want, margins)
        assert ok, (
            f"{label}: prompt of {len(prompt)} tokens diverges at new token {n}: "
            f"engine {got[n]} vs transformers {want[n]} (margin {margins[n]:.2e})\n"
            f"engine {got}\ntransformers {want}"
        )
        near_ties += n < NEW_TOKENS
    print(f"\n[oracle] {label}: {len(cases)} prompts, near-tie divergences: {near_ties}")
    assert near_ties <= len(cases) // 4, "near-ties should be rare, never the norm"


def _run(engine: Engine, cases, concurrent: bool) -> list[list[int]]:
    async def main() -> list[list[int]]:
        client = engine.client()
        try:
            if concurrent:
                return await asyncio.gather(*(_generate(client, p) for p, _, _ in cases))
            return [await _generate(client, p) for p, _, _ in cases]
        finally:
            client.close()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def default_engine():
    with Engine.start(None, dtype="float32", max_batch_total_tokens=8192) as engine:
        yield engine


def test_alone(default_engine, cases):
    _check("alone", cases, _run(default_engine, cases, concurrent=False))


def test_concurrent(default_engine, cases):
    before = asyncio.run(engine_stats(default_engine))
    _check("concurrent", cases, _run(default_engine, cases, concurrent=True))
    stats = asyncio.run(engine_stats(default_engine))
    assert stats.blocks_free == stats.blocks_total, "every block is back in the pool"
    # Every prompt ran before (test_alone): its whole blocks are reused, except that
    # at least one token is computed (a prompt filling its last block recomputes it).
    hits = sum((len(p) - 1) // 16 * 16 for p, _, _ in cases)
    assert stats.cache_hit_tokens - before.cache_hit_tokens == hits > 0


def test_chunked_prefill(cases):
    with Engine.start(
        None,
        dtype="float32",
        max_batch_total_tokens=8192,
        max_batch_prefill_tokens=64,
        prefix_caching=False,
    ) as engine:
        _check("chunked prefill (64), no prefix cache", cases, _run(engine, cases, True))
        stats = asyncio.run(engine_stats(engine))
    assert stats.cache_hit_tokens == 0 and stats.cached_blocks == 0
    longest = max(len(p) for p, _, _ in cases)
    assert stats.steps >= longest // 64, "long prompts were split over several steps"
    assert stats.blocks_free == stats.blocks_total


def test_preemption_with_speculative_decoding(cases, default_engine):
    """A KV cache that forces preemption and evictions, with `--speculate 4` (n-gram
    proposals) on: greedy tokens are the oracle's (every row speculates: up to 16 run);
    a seeded sampled request draws the very tokens it draws without speculation
    (`default_engine`)."""
    # Room for the longest of these requests (257 + 24 tokens) but not for all at once.
    cases = cases[:6]
    with Engine.start(
        None,
        dtype="float32",
        max_batch_total_tokens=512,
        max_batch_prefill_tokens=128,
        speculate=4,
        speculate_max_batch=16,
    ) as engine:
        _check("preemption, speculate 4", cases, _run(engine, cases, concurrent=True))
        first = asyncio.run(engine_stats(engine))
        # 32 blocks cannot keep every prompt's blocks: some were evicted, some remain.
        _check("after evictions", cases, _run(engine, cases, concurrent=True))
        stats = asyncio.run(engine_stats(engine))
        spec_draws = asyncio.run(_sampled(engine, [c[0] for c in cases[:3]]))
        spec = asyncio.run(engine_stats(engine))
    print(f"[oracle] preemptions: {first.preemptions}, cache hits {stats.cache_hit_tokens}")
    assert first.preemptions > 0, "the small KV cache must have forced preemption"
    total = sum(len(p) - 1 for p, _, _ in cases)
    assert 0 < stats.cache_hit_tokens - first.cache_hit_tokens < total
    assert spec.blocks_free == spec.blocks_total
    print(f"[oracle] speculation: {spec.spec_accepted_tokens}/{spec.spec_proposed_tokens}")
    assert 0 < spec.spec_accepted_tokens < spec.spec_proposed_tokens
    assert spec_draws == asyncio.run(_sampled(default_engine, [c[0] for c in cases[:3]]))


def test_draft_model_speculation_follows_the_oracle(cases):
    """`--speculative-model` with the target itself as its draft (the one model with
    its tokenizer on this disk), through chunked prefill, preemption and the prefix
    cache: greedy tokens are the oracle's, and the draft, whose KV cache must keep in
    step with the target's (prompt chunks, recomputes, accepted and rejected
    proposals, cached blocks), proposes what the target picks nearly always."""
    cases = cases[1:5]  # prompts of 6 to 130 tokens: together they do not fit in 256
    with Engine.start(
        None,
        dtype="float32",
        max_batch_total_tokens=256,
        max_batch_prefill_tokens=64,
        speculate=4,
        speculate_max_batch=16,
        speculative_model=default_gguf_path(),
    ) as engine:
        _check("draft model, speculate 4", cases, _run(engine, cases, concurrent=True))
        first = asyncio.run(engine_stats(engine))
        _check("draft model, again", cases, _run(engine, cases, concurrent=True))
        stats = asyncio.run(engine_stats(engine))
    print(f"[oracle] draft: {stats.spec_accepted_tokens}/{stats.spec_proposed_tokens} accepted")
    assert first.preemptions > 0 and stats.cache_hit_tokens > first.cache_hit_tokens
    assert stats.spec_accepted_tokens > 0.9 * stats.spec_proposed_tokens > 0
    assert stats.blocks_free == stats.blocks_total


async def _sampled(engine: Engine, prompts_: list[list[int]]) -> list[list[int]]:
    """Three seeded, sampled requests at once."""
    sampled = [
        SamplingParams(max_new_tokens=24, do_sample=True, temperature=t, top_p=p, seed=s)
        for t, p, s in ((0.7, 1.0, 1), (1.0, 0.9, 2), (1.3, 1.0, 3))
    ]
    client = engine.client()
    try:
        runs = (_tokens(client, p, q) for p, q in zip(prompts_, sampled, strict=True))
        return list(await asyncio.gather(*runs))
    finally:
        client.close()


def test_one_step_at_a_time_follows_the_oracle(cases):
    """Overlapped scheduling and the plan's shared-memory ring off (every other test has
    them on, the default): concurrent, chunked and preempted requests still give the
    oracle's tokens."""
    cases = cases[:6]
    with Engine.start(
        None,
        dtype="float32",
        max_batch_total_tokens=512,
        max_batch_prefill_tokens=64,
        overlap_scheduling=False,
        shared_memory=False,
    ) as engine:
        _check("serial scheduling, frames", cases, _run(engine, cases, concurrent=True))
        stats = asyncio.run(engine_stats(engine))
    assert stats.preemptions > 0 and stats.blocks_free == stats.blocks_total


async def _tokens(client, prompt: list[int], params: SamplingParams) -> list[int]:
    return [o.token_id async for o in client.generate(prompt, params) if o.token_id >= 0]


def test_concurrent_stats_requests_all_answered(default_engine) -> None:
    async def main() -> list:
        client = default_engine.client()
        try:
            return await asyncio.wait_for(asyncio.gather(*(client.stats() for _ in range(5))), 10)
        finally:
            client.close()

    stats = asyncio.run(main())
    assert len(stats) == 5 and all(s.blocks_total > 0 for s in stats)


# bf16 weights and activations move logits by a few tenths against float32: where the
# reference's two best logits are closer than this, either greedy pick is right.
BF16_NEAR_TIE = 0.5
SHORT = 6  # the other dtypes run the prompts of up to 257 tokens (the suite's time)


def test_auto_dtype_is_native_bf16_and_follows_the_oracle(cases) -> None:
    """`--dtype auto` on the CPU: bfloat16 where the CPU multiplies it natively, with the
    C++ attention kernel (its greedy tokens are float32 transformers' until a near-tie),
    float32 and the torch reference elsewhere."""
    from tgi_mp.executor.device import native_bf16_isa

    cases = cases[:SHORT]
    with Engine.start(None, max_batch_total_tokens=8192) as engine:
        dtype, attention = engine.ready.dtype, engine.ready.attention_backend
        outputs = _run(engine, cases, concurrent=True)
    if native_bf16_isa() is None:
        assert (dtype, attention) == ("float32", "torch")
        _check("auto dtype (float32 here)", cases, outputs)
        return
    assert (dtype, attention) == ("bfloat16", "cpu")
    _check_near("auto dtype bf16", cases, outputs, BF16_NEAR_TIE)


# int8 weights (one scale per output channel) move logits a little more than bf16 does.
INT8_NEAR_TIE = 1.0


@pytest.mark.parametrize(
    ("dtype", "quantize", "near_tie"),
    [
        ("float32", "int8", INT8_NEAR_TIE),
        # int4 on the Q4_1 GGUF takes its bits as shipped: only bf16 arithmetic
        # (activations, and the kernel's scales) separates it from the reference.
        ("bfloat16", "int4", BF16_NEAR_TIE),
    ],
)
def test_quantized_weights_follow_the_oracle_up_to_near_ties(
    cases, dtype: str, quantize: str, near_tie: float
) -> None:
    cases = cases[:SHORT]
    with Engine.start(None, dtype=dtype, quantize=quantize, max_batch_total_tokens=8192) as engine:
        outputs = _run(engine, cases, concurrent=True)
    _check_near(f"{quantize} weights", cases, outputs, near_tie)


def _check_near(label: str, cases, outputs: list[list[int]], near_tie: float) -> None:
    """Each output is the reference's until a near-tie; together they agree on at least a
    quarter of the tokens (a broken path diverges at once, at clear margins)."""
    agreed = 0
    for (prompt, want, margins), got in zip(cases, outputs, strict=True):
        ok, n = compare(got, want, margins, near_tie)
        assert ok, (
            f"{label}: prompt of {len(prompt)} tokens diverges at new token {n}: engine "
            f"{got[n]} vs transformers {want[n]}, whose two best logits are {margins[n]:.3f} apart"
        )
        agreed += n
    print(f"\n[oracle] {label}: {agreed} of {len(cases) * NEW_TOKENS} tokens before a near-tie")
    assert agreed >= len(cases) * NEW_TOKENS // 4


# ---------------------------------------------------------------- grammars beside free rows

GRAMMAR_NEW = 16
SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "tag": {"enum": ["a", "b"]}},
        "required": ["n", "tag"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
]
PHONE = r"[0-9]{3}-[0-9]{4}"


def test_constrained_and_free_requests_share_a_batch(default_engine) -> None:
    """16 at once, half constrained (three schemas and a regex), half free: every
    constrained answer is valid, every free one is what it is alone (greedy)."""
    tok = Tokenizer.from_file(f"{export_tokenizer(resolve_model(None))}/tokenizer.json")
    prompts = [
        tok.encode(f"Item {i} of the list is", add_special_tokens=False).ids for i in range(8)
    ]
    constraints = [grammar.from_tgi({"type": "json", "value": s}) for s in SCHEMAS]
    constraints.append(grammar.from_tgi({"type": "regex", "value": PHONE}))
    free = SamplingParams(max_new_tokens=GRAMMAR_NEW)

    async def main() -> tuple[list, list, list]:
        client = default_engine.client()

        async def run(prompt: list[int], params: SamplingParams) -> list[int]:
            return [o.token_id async for o in client.generate(prompt, params)]

        try:
            alone = [await run(p, free) for p in prompts]
            mixed = await asyncio.gather(
                *(run(p, free) for p in prompts),
                *(
                    run(p, SamplingParams(max_new_tokens=64, grammar=constraints[i % 4]))
                    for i, p in enumerate(prompts)
                ),
            )
        finally:
            client.close()
        return alone, mixed[:8], mixed[8:]

    alone, mixed_free, constrained = asyncio.run(main())
    assert mixed_free == alone
    for i, ids in enumerate(constrained):
        text = tok.decode([t for t in ids if t not in (0, 1, 2)])
        if i % 4 == 3:
            assert re.fullmatch(PHONE, text), text
        else:
            jsonschema.validate(json.loads(text), SCHEMAS[i % 4])
