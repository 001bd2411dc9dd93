"""The scheduler's grammar path with the bundled model's real tokenizer: matchers built
off the loop, masks for exactly the constrained sampled rows, tokens consumed, the
request ended when its grammar completes, failed when a token breaks it."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from tokenizers import Tokenizer

from tgi_mp.frontend import grammar
from tgi_mp.ipc.messages import AddRequest, FinishReason, SamplingParams
from tgi_mp.model_source import load_model_config, resolve_model
from tgi_mp.scheduler.grammar import Grammars, read_tokenizer
from tgi_mp.scheduler.scheduler import Scheduler, SchedulerConfig
from tgi_mp.tokenizer_export import export_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["n", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model():
    source = resolve_model(None)
    mc = load_model_config(source)
    directory = export_tokenizer(source)
    return mc, directory, Tokenizer.from_file(f"{directory}/tokenizer.json")


@pytest.fixture()
def scheduler(model):
    mc, directory, _ = model
    grammars = Grammars(read_tokenizer(directory), mc.vocab_size, mc.eos_token_ids)
    cfg = SchedulerConfig(
        num_blocks=64, block_size=16, max_batch_prefill_tokens=64,
        eos_token_ids=frozenset(mc.eos_token_ids), vocab_size=mc.vocab_size,
    )  # fmt: skip
    yield Scheduler(cfg, grammars=grammars)
    grammars.close()


def _allowed(row: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))


def _run(s: Scheduler, pick, steps: int = 200) -> dict[int, tuple[list[int], FinishReason, str]]:
    """Steps until every request ended: `pick(req_id, allowed ids or None)` samples."""
    out: dict[int, tuple[list[int], FinishReason | None, str | None]] = {}
    for _ in range(steps):
        step, ended = s.schedule()
        for o in ended:
            out[o.req.req_id] = ([], o.finish, o.error)
        if step is None:
            if not s.has_work():
                break
            time.sleep(0.005)  # a matcher is being built
            continue
        plan = step.plan
        sampled = np.flatnonzero(plan.sampling.sample)
        assert set(plan.grammar.rows) <= set(sampled)
        assert [step.reqs[i].matcher is not None for i in sampled] == [
            i in plan.grammar.rows for i in sampled
        ]
        masks = s.grammars.masks([step.reqs[i].matcher for i in plan.grammar.rows])
        mask_of = dict(zip(plan.grammar.rows.tolist(), masks, strict=True))
        tokens = [
            pick(step.reqs[i].req_id, _allowed(mask_of[i]) if i in mask_of else None)
            for i in sampled
        ]
        for o in s.update(step, np.array(tokens, dtype=np.int32)):
            got = out.setdefault(o.req.req_id, ([], None, None))
            if o.token >= 0:
                got[0].append(o.token)
            out[o.req.req_id] = (got[0], o.finish, o.error)
    return out


def test_constrained_requests_follow_their_grammar_and_end_when_it_completes(
    scheduler, model
) -> None:
    _, _, tok = model
    g = grammar.from_tgi({"type": "json", "value": SCHEMA})
    prompt = np.array(tok.encode("JSON:").ids, dtype=np.int32)
    scheduler.add(AddRequest(1, prompt, SamplingParams(max_new_tokens=40, grammar=g)))
    scheduler.add(AddRequest(2, prompt, SamplingParams(max_new_tokens=5)))  # free: no mask
    free_token = tok.token_to_id("a")

    def pick(req_id: int, allowed: np.ndarray | None) -> int:
        if allowed is None:
            assert req_id == 2
            return free_token
        assert req_id == 1 and len(allowed)
        return int(allowed[-1])  # the highest allowed id: far from a "natural" choice

    out = _run(scheduler, pick)
    tokens, reason, error = out[1]
    assert error is None and reason == FinishReason.EOS, tok.decode(tokens)
    value = json.loads(tok.decode(tokens))
    assert set(value) == {"n", "ok"} and 0 <= value["n"] <= 99
    assert out[2][1] == FinishReason.LENGTH and out[2][0] == [free_token] * 5
    assert not scheduler.has_work()


def test_a_token_outside_the_grammar_fails_only_its_request(scheduler, model) -> None:
    _, _, tok = model
    g = grammar.from_tgi({"type": "regex", "value": "[0-9]+"})
    prompt = np.array(tok.encode("Digits:").ids, dtype=np.int32)
    scheduler.add(AddRequest(1, prompt, SamplingParams(max_new_tokens=10, grammar=g)))
    scheduler.add(AddRequest(2, prompt, SamplingParams(max_new_tokens=10, grammar=g)))
    letter = tok.token_to_id("a")

    def pick(req_id: int, allowed: np.ndarray | None) -> int:
        assert allowed is not None
        digits = [t for t in allowed.tolist() if t not in model[0].eos_token_ids]
        return letter if req_id == 1 else digits[0]

    out = _run(scheduler, pick)
    assert out[1][1] == FinishReason.ERROR and "broke the grammar" in out[1][2]
    assert out[2][1] == FinishReason.LENGTH and tok.decode(out[2][0]).isdigit()


def test_a_request_waits_for_its_matcher_without_holding_up_others(scheduler, model) -> None:
    _, _, tok = model
    prompt = np.array(tok.encode("Hi").ids, dtype=np.int32)
    gate = scheduler.grammars._pool.submit(time.sleep, 0.3)  # the worker is busy
    g = grammar.from_tgi({"type": "regex", "value": "x+"})
    scheduler.add(AddRequest(1, prompt, SamplingParams(max_new_tokens=3, grammar=g)))
    scheduler.add(AddRequest(2, prompt, SamplingParams(max_new_tokens=3)))
    step, _ = scheduler.schedule()
    assert [r.req_id for r in step.reqs] == [2] and not gate.done()
    assert scheduler.building_matchers()
