"""The scheduling policy against a fake executor that keeps a fake KV cache.

The fake executor writes every input token into the slot its block table and
position name, and computes each sampled token from the history it reads back
*out of that cache*. A wrong, stale or shared block table, or a wrong position,
therefore changes the tokens, and comparing them with `reference` (the same
function on the true token list) checks the scheduler's KV bookkeeping, not
only its counters.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest

from tgi_mp.ipc.messages import AddRequest, FinishReason, SamplingParams, StepPlan
from tgi_mp.scheduler.admission import RequestRejected
from tgi_mp.scheduler.request import Request, Status
from tgi_mp.scheduler.scheduler import Scheduler, SchedulerConfig

EOS = 0
VOCAB = 1000

TokenFn = Callable[[np.ndarray], int]


def hash_token(history: np.ndarray) -> int:
    """A deterministic 'model': any change in the history changes the next token (mostly)."""
    digest = hashlib.blake2b(history.astype(np.int32).tobytes(), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % (VOCAB - 1)  # never EOS


def reference(
    prompt: np.ndarray, params: SamplingParams, eos: frozenset[int], fn: TokenFn = hash_token
) -> tuple[list[int], FinishReason]:
    """What one request alone must produce, with the finish rules of `Request.finish_reason`."""
    history, out = [int(t) for t in prompt], []
    while True:
        tok = fn(np.array(history, dtype=np.int32))
        history.append(tok)
        out.append(tok)
        if len(out) >= params.max_new_tokens:
            return out, FinishReason.LENGTH
        if not params.ignore_eos and tok in eos:
            return out, FinishReason.EOS
        if tok in params.stop_token_ids:
            return out, FinishReason.STOP_SEQUENCE


class FakeExecutor:
    """Executes plans on a token-id 'KV cache': slot -> the token whose KV would live there."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        fn: TokenFn = hash_token,
        overlap: bool = False,
        draft: TokenFn | None = None,
    ) -> None:
        self.bs = block_size
        # A draft model's guess of `fn`: it fills the proposals' placeholders, as the
        # runner's draft model does (None: the plan's proposals are n-gram lookups).
        self.draft = draft
        self.num_blocks = num_blocks
        self.kv = np.full(num_blocks * block_size, -1, dtype=np.int64)
        self.fn = fn
        self.last = np.empty(0, dtype=np.int32)  # the previous step's sampled tokens
        # Overlapped scheduling (scheduler.main's loop with overlap on): the step sent
        # and not yet applied, as (step, sampled tokens, prompt scores).
        self.overlap = overlap
        self.inflight: tuple | None = None
        self.lora_slots: dict[int, int] = {}  # LoRA slot -> the adapter loaded in it

    def _slots(self, table: np.ndarray, start: int, stop: int) -> np.ndarray:
        pos = np.arange(start, stop)
        assert stop <= len(table) * self.bs, "block table too short for the positions"
        return table[pos // self.bs].astype(np.int64) * self.bs + pos % self.bs

    def step(self, plan: StepPlan) -> np.ndarray:
        lay, smp = plan.layout, plan.sampling
        b = len(lay.query_lens)
        per_row = (lay.context_lens, lay.block_counts, smp.sample, smp.temperature, smp.seeds)
        assert all(len(column) == b for column in (*per_row, plan.penalties.seq_ids))
        assert len(lay.input_ids) == lay.query_lens.sum()
        assert len(lay.block_tables) == lay.block_counts.sum()
        assert lay.query_lens.min() >= 1
        assert ((lay.block_tables >= 0) & (lay.block_tables < self.num_blocks)).all()
        tables = np.split(lay.block_tables, np.cumsum(lay.block_counts)[:-1])
        starts = np.concatenate([[0], np.cumsum(lay.query_lens)])
        ids = lay.input_ids
        if lay.input_from is not None:  # tokens of the previous step, as runner fills them in
            assert self.overlap, "a plan refers back to a step whose tokens were applied"
            rows = np.flatnonzero(lay.input_from >= 0)
            ids = ids.copy()
            ids[starts[rows + 1] - 1] = self.last[lay.input_from[rows]]
        if self.draft is not None and plan.speculative is not None:
            ids = ids.copy()
            for i in np.flatnonzero(plan.speculative):
                k, end = int(plan.speculative[i]), int(starts[i + 1])
                assert not ids[end - k : end].any(), "a draft placeholder that is not 0"
                c = int(lay.context_lens[i])
                history = self.kv[self._slots(tables[i], 0, c)]
                history = np.concatenate([history, ids[starts[i] : end - k]])
                for j in range(end - k, end):
                    ids[j] = self.draft(history)
                    history = np.append(history, ids[j])
        # Write every row's KV first, then read: as in a real forward pass, a block
        # shared by two rows of one step corrupts one of them.
        for i in range(b):
            c, q = int(lay.context_lens[i]), int(lay.query_lens[i])
            self.kv[self._slots(tables[i], c, c + q)] = ids[starts[i] : starts[i + 1]]
        out, counts, last = [], [], []
        proposed = plan.speculative if plan.speculative is not None else np.zeros(b, np.int32)
        for i in range(b):
            if smp.sample[i]:
                end = int(lay.context_lens[i] + lay.query_lens[i])
                k = int(proposed[i])
                # The target's token after each of the row's last k + 1 inputs, as long as
                # the proposals (those inputs) agree with it: runner.py's verification.
                for j in range(k + 1):
                    history = self.kv[self._slots(tables[i], 0, end - k + j)]
                    assert (history >= 0).all(), "read a slot that was never written"
                    out.append(self.fn(history))
                    if j == k or out[-1] != ids[starts[i + 1] - k + j]:
                        break
                counts.append(j + 1)
                last.append(out[-1])
        self.counts = np.array(counts, dtype=np.int32)
        self.last = np.array(last, dtype=np.int32)  # what the next plan may refer to
        return np.array(out, dtype=np.int32)

    @staticmethod
    def score_prompt(plan: StepPlan) -> np.ndarray:
        """Prompt 'logprobs' that name what they score: target id * 1000 + position."""
        starts = np.cumsum(plan.layout.query_lens) - plan.layout.query_lens
        values = []
        for i, n in enumerate(plan.prompt_logprobs.counts.tolist()):
            assert n <= plan.layout.query_lens[i]
            # Within the chunk, position j's target is the input token at j + 1.
            row_inputs = plan.layout.input_ids[starts[i] : starts[i] + plan.layout.query_lens[i]]
            targets = plan.prompt_logprobs.targets[len(values) : len(values) + n]
            assert (targets[: plan.layout.query_lens[i] - 1] == row_inputs[1 : n + 1]).all()
            values += [t * 1000.0 + plan.layout.context_lens[i] + j for j, t in enumerate(targets)]
        assert len(values) == len(plan.prompt_logprobs.targets)
        return np.array(values, dtype=np.float32)

    @staticmethod
    def score_tops(plan: StepPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Ranks and top tokens that name what they score: rank target % 7 + 1, top id
        c = target + c, its logprob position + c / 10."""
        top_k, counts = plan.prompt_logprobs.top_k, plan.prompt_logprobs.counts
        k = -1 if top_k is None else int(top_k[counts > 0].max(initial=-1))
        if k < 0:
            return None
        targets = plan.prompt_logprobs.targets.astype(np.int64)
        positions = np.concatenate(
            [
                plan.layout.context_lens[i] + np.arange(n)
                for i, n in enumerate(plan.prompt_logprobs.counts.tolist())
            ]
            or [np.empty(0, np.int64)]
        )
        columns = np.arange(k)
        return (
            (targets % 7 + 1).astype(np.int32),
            (targets[:, None] + columns).astype(np.int32),
            (positions[:, None] + columns / 10).astype(np.float32),
        )


@dataclass
class Trace:
    """What a client of each request saw, plus per-step records for budget checks."""

    tokens: dict[tuple[bytes, int], list[int]] = field(default_factory=dict)
    finish: dict[tuple[bytes, int], FinishReason] = field(default_factory=dict)
    plans: list[tuple[StepPlan, list[Request]]] = field(default_factory=list)
    prompt_logprobs: dict[tuple[bytes, int], np.ndarray] = field(default_factory=dict)
    prompt_tops: dict[tuple[bytes, int], tuple] = field(default_factory=dict)

    def saw(self, frontend: bytes, req_id: int, token: int, reason: FinishReason | None) -> None:
        key = (frontend, req_id)
        assert key not in self.finish, f"{key} got news after it finished"
        if token >= 0:
            self.tokens.setdefault(key, []).append(token)
        if reason is not None:
            self.finish[key] = reason


def check_bookkeeping(s: Scheduler) -> None:
    """Each block's count is the number of running requests holding it (several only for
    a cached, full prefix block), or 0 when free; waiting requests hold none."""
    owned = Counter(b for r in s.running for b in r.block_ids)
    assert all(len(set(r.block_ids)) == len(r.block_ids) for r in s.running)
    for b, count in enumerate(s.pool.ref_counts):
        assert count == owned.get(b, 0), f"block {b} has ref count {count}"
        if count > 1:
            assert s.pool._key[b] is not None, f"block {b} is shared but not a cached block"
    assert s.pool.num_free == s.pool.num_blocks - len(owned)
    assert all(not r.block_ids and r.status == Status.WAITING for r in s.waiting)
    assert all(r.status == Status.RUNNING for r in s.running)
    assert len(s.running) <= s.cfg.sequences_per_step
    for r in s.running:  # between steps, a request owns the blocks of what it computed
        # (and of what the step in flight computes), no more
        assert len(r.block_ids) == s.pool.blocks_for(r.planned_computed)
        if s.cfg.prefix_caching and not r.params.prefill_logprobs:  # full blocks are keyed
            assert len(r.block_keys) == r.num_computed // s.cfg.block_size


def assert_drained(s: Scheduler) -> None:
    assert not s.has_work() and not s.requests
    assert s.pool.num_free == s.pool.num_blocks
    assert all(c == 0 for c in s.pool.ref_counts)


def step_once(s: Scheduler, ex: FakeExecutor, trace: Trace, between: Callable[[], None]) -> bool:
    """One scheduler iteration as `scheduler.main` runs it; False when idle. With
    overlap, the step planned now is sent (the fake executor runs it at once, after the
    step in flight, as real executors would) before the step in flight is applied."""
    step, ended = s.schedule()
    for out in ended:
        trace.saw(out.req.frontend, out.req.req_id, out.token, out.finish)
    sent = None
    if step is not None:
        plan = step.plan
        cfg = s.cfg
        assert plan.layout.query_lens.sum() <= cfg.max_batch_prefill_tokens
        assert len(plan.layout.query_lens) <= cfg.sequences_per_step
        in_flight = Counter()  # tokens each request samples in the step in flight
        if ex.inflight is not None:
            before = ex.inflight[0]
            for req, sampled in zip(before.reqs, before.plan.sampling.sample.tolist(), strict=True):
                in_flight[(req.frontend, req.req_id)] += sampled and req.status == Status.RUNNING
        for i, req in enumerate(step.reqs):
            key = (req.frontend, req.req_id)
            # The sampler's random stream is keyed by (seed, tokens generated so far).
            generated = len(trace.tokens.get(key, [])) + in_flight[key]
            assert plan.sampling.sample_index[i] == generated
            assert plan.sampling.seeds[i] == req.seed
        if plan.lora is not None:  # each row runs with its adapter, in the slot it names
            lora = plan.lora
            for slot, adapter in zip(lora.load_slots, lora.load_adapters, strict=True):
                ex.lora_slots[int(slot)] = int(adapter)
            for req, slot in zip(step.reqs, lora.slots.tolist(), strict=True):
                assert (ex.lora_slots[slot] if slot >= 0 else -1) == req.params.adapter
        trace.plans.append((plan, list(step.reqs)))
        tokens = ex.step(plan)
        sent = (step, tokens, ex.score_prompt(plan), ex.counts, ex.score_tops(plan))
    between()  # e.g. a client aborts while a step is in flight
    if ex.overlap:
        applied, ex.inflight = ex.inflight, sent
    else:
        applied = sent
    if applied is not None:
        for out in s.update(*applied):
            trace.saw(out.req.frontend, out.req.req_id, out.token, out.finish)
            if out.prompt_logprobs is not None:
                key = (out.req.frontend, out.req.req_id)
                assert key not in trace.prompt_logprobs, "prompt logprobs sent twice"
                trace.prompt_logprobs[key] = out.prompt_logprobs.copy()
                if out.prompt_tops is not None:
                    trace.prompt_tops[key] = tuple(a.copy() for a in out.prompt_tops)
    check_bookkeeping(s)
    return step is not None or ex.inflight is not None


def run_all(
    s: Scheduler,
    ex: FakeExecutor,
    trace: Trace | None = None,
    before: Callable[[int], None] = lambda i: None,
    between: Callable[[], None] = lambda: None,
    max_steps: int = 10_000,
) -> Trace:
    """Steps until nothing is left; `before(i)` runs ahead of step i (new requests, aborts)."""
    trace = trace or Trace()
    for i in range(max_steps):
        before(i)
        if not step_once(s, ex, trace, between) and not s.has_work():
            return trace
    raise AssertionError("the scheduler made no progress")


def add(
    s: Scheduler, req_id: int, prompt: np.ndarray | list[int], frontend: bytes = b"f0", **params
) -> Request:
    msg = AddRequest(req_id, np.asarray(prompt, dtype=np.int32), SamplingParams(**params))
    return s.add(msg, frontend)


def prompt_of(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(1, VOCAB, n, dtype=np.int32)


@pytest.fixture(params=[False, True], ids=["serial", "overlap"])
def make(request) -> Iterator[Callable[..., tuple[Scheduler, FakeExecutor]]]:
    """Builds a scheduler and its fake executor, driven one step at a time and with
    overlapped scheduling; after the test, every block must be free."""
    yield from _builder(request.param)


@pytest.fixture
def make_serial() -> Iterator[Callable[..., tuple[Scheduler, FakeExecutor]]]:
    """`make`, one step at a time only: for white-box tests that plan and apply steps by
    hand at chosen points (overlap's own timing is the stress test's)."""
    yield from _builder(False)


def _builder(overlap: bool) -> Iterator[Callable[..., tuple[Scheduler, FakeExecutor]]]:
    made: list[Scheduler] = []

    def build(
        num_blocks: int = 64, block_size: int = 4, fn: TokenFn = hash_token, **kw
    ) -> tuple[Scheduler, FakeExecutor]:
        draft = kw.pop("draft", None)
        cfg = SchedulerConfig(
            num_blocks=num_blocks, block_size=block_size, speculate_draft=draft is not None, **kw
        )
        s = Scheduler(cfg)
        made.append(s)
        return s, FakeExecutor(num_blocks, block_size, fn, overlap=overlap, draft=draft)

    yield build
    for s in made:
        assert_drained(s)


def check_outputs(
    trace: Trace, reqs: list[Request], eos: frozenset[int] = frozenset(), fn: TokenFn = hash_token
) -> None:
    for r in reqs:
        want_tokens, want_reason = reference(r.tokens[: r.num_prompt], r.params, eos, fn)
        key = (r.frontend, r.req_id)
        assert trace.tokens[key] == want_tokens, f"request {key}"
        assert trace.finish[key] == want_reason, f"request {key}"


# ---------------------------------------------------------------- basics


def test_single_request_matches_reference(make) -> None:
    s, ex = make()
    r = add(s, 1, [5, 6, 7, 8, 9], max_new_tokens=12)
    trace = run_all(s, ex)
    check_outputs(trace, [r])
    assert len(trace.plans) == 12  # one prefill step (it samples) + 11 decode steps
    assert s.stats.prefill_tokens == 5 and s.stats.decode_tokens == 11


def test_concurrent_requests_match_reference(make) -> None:
    rng = np.random.default_rng(0)
    s, ex = make(num_blocks=128)
    reqs = [
        add(s, i, prompt_of(rng, int(rng.integers(1, 30))), max_new_tokens=int(rng.integers(1, 20)))
        for i in range(12)
    ]
    check_outputs(run_all(s, ex), reqs)


def test_budget_and_batch_size_respected(make) -> None:
    rng = np.random.default_rng(1)
    s, ex = make(num_blocks=256, max_batch_prefill_tokens=16, max_batch_size=3)
    reqs = [add(s, i, prompt_of(rng, 10), max_new_tokens=6) for i in range(10)]
    trace = run_all(s, ex)  # `step_once` asserts both limits on every plan
    check_outputs(trace, reqs)
    assert (
        max(len(p.layout.query_lens) for p, _ in trace.plans) == 3
    )  # the cap was actually reached
    assert max(int(p.layout.query_lens.sum()) for p, _ in trace.plans) == 16
    total = sum(int(p.layout.query_lens.sum()) for p, _ in trace.plans)
    assert s.stats.prefill_tokens + s.stats.decode_tokens == total


def test_long_prompt_is_chunked(make) -> None:
    rng = np.random.default_rng(2)
    s, ex = make(num_blocks=64, max_batch_prefill_tokens=32)
    r = add(s, 1, prompt_of(rng, 100), max_new_tokens=3)
    trace = run_all(s, ex)
    check_outputs(trace, [r])
    rows = [
        (int(p.layout.context_lens[0]), int(p.layout.query_lens[0]), bool(p.sampling.sample[0]))
        for p, _ in trace.plans
    ]
    assert rows[:4] == [(0, 32, False), (32, 32, False), (64, 32, False), (96, 4, True)]
    assert rows[4:] == [(100, 1, True), (101, 1, True)]


def test_decode_rows_mix_with_prefill_chunks(make) -> None:
    rng = np.random.default_rng(3)
    s, ex = make(num_blocks=128, max_batch_prefill_tokens=16)
    a = add(s, 1, prompt_of(rng, 4), max_new_tokens=20)
    b = None

    def before(i: int) -> None:
        nonlocal b
        if i == 2:  # `a` is decoding by now
            b = add(s, 2, prompt_of(rng, 60), max_new_tokens=4)

    trace = run_all(s, ex, before=before)
    check_outputs(trace, [a, b])
    mixed = [p for p, reqs in trace.plans if len(reqs) == 2 and not p.sampling.sample[1]]
    assert len(mixed) >= 3  # `b` took several chunks, each beside a decode row of `a`
    for p in mixed:
        assert (
            p.layout.query_lens[0] == 1 and p.sampling.sample[0]
        )  # `a` kept decoding: never stalled
        assert p.layout.query_lens.sum() == 16  # the chunk filled the rest of the budget


def test_preempted_requests_resume_invisibly(make) -> None:
    rng = np.random.default_rng(4)
    # 12 blocks of 4 = 48 tokens; four requests growing to 8 + 30 tokens each cannot all fit.
    s, ex = make(num_blocks=12, max_batch_prefill_tokens=64)
    reqs = [add(s, i, prompt_of(rng, 8), max_new_tokens=30) for i in range(4)]
    trace = run_all(s, ex)
    assert s.stats.preemptions > 0
    assert any(r.num_preemptions > 0 for r in reqs)
    check_outputs(trace, reqs)
    # A resumed request recomputes prompt + generated tokens in one prefill row and samples
    # its next token at once; that recompute is prefill work, not decode.
    total = sum(int(p.layout.query_lens.sum()) for p, _ in trace.plans)
    decode_rows = sum(
        1
        for p, rs in trace.plans
        for i, r in enumerate(rs)
        if p.layout.query_lens[i] == 1 and p.layout.context_lens[i] + 1 > r.num_prompt
    )
    assert s.stats.decode_tokens == decode_rows
    assert s.stats.prefill_tokens == total - decode_rows


def test_prefill_chunk_shrinks_to_free_blocks(make) -> None:
    # 6 blocks of 4. B (4 + 4 tokens) is admitted first, then A's 20-token prompt
    # starts with a 12-token chunk. Next step only one block is left after B's
    # decode: A's chunk must shrink to the 4 tokens that fit, not preempt A.
    s, ex = make(num_blocks=6, block_size=4, max_batch_prefill_tokens=16)
    b = add(s, 1, list(range(1, 5)), max_new_tokens=4)
    a = add(s, 2, list(range(101, 121)), max_new_tokens=1)
    trace = Trace()
    step_once(s, ex, trace, lambda: None)
    assert trace.plans[0][0].layout.query_lens.tolist() == [4, 12]
    step_once(s, ex, trace, lambda: None)
    assert trace.plans[1][0].layout.query_lens.tolist() == [1, 4]
    assert s.stats.preemptions == 0
    check_outputs(run_all(s, ex, trace), [a, b])


def test_preemption_with_chunked_resume(make) -> None:
    rng = np.random.default_rng(5)
    s, ex = make(num_blocks=10, max_batch_prefill_tokens=6, max_batch_size=4)
    reqs = [
        add(s, i, prompt_of(rng, int(rng.integers(3, 15))), max_new_tokens=20) for i in range(6)
    ]
    trace = run_all(s, ex)
    assert s.stats.preemptions > 0
    check_outputs(trace, reqs)


def test_prompt_ranks_and_top_tokens_follow_chunks(make) -> None:
    """vLLM's prompt_logprobs: each request keeps its own first k of the step's top
    tokens (k = the most any row asks), position by position, across chunks."""
    rng = np.random.default_rng(7)
    s, ex = make(num_blocks=64, max_batch_prefill_tokens=6, max_batch_size=4)
    ks = [-1, 0, 1, 3, None, 2]  # None: no prompt scoring; -1: logprobs only (TGI's)
    reqs = [
        add(
            s,
            i,
            prompt_of(rng, int(rng.integers(4, 15))),
            max_new_tokens=3,
            prefill_logprobs=k is not None,
            prompt_top_k=-1 if k is None else k,
        )
        for i, k in enumerate(ks)
    ]
    trace = run_all(s, ex)
    check_outputs(trace, reqs)
    for r, k in zip(reqs, ks, strict=True):
        key = (r.frontend, r.req_id)
        if k is None or k < 0:
            assert key not in trace.prompt_tops
            continue
        ranks, ids, lps = trace.prompt_tops[key]
        prompt = r.tokens[: r.num_prompt].astype(np.int64)
        assert ids.shape == lps.shape == (r.num_prompt, k)
        assert ranks[0] == 0 and (ids[0] == -1).all()  # the first token is unscored
        np.testing.assert_array_equal(ranks[1:], prompt[1:] % 7 + 1)
        columns = np.arange(k)
        np.testing.assert_array_equal(ids[1:], prompt[1:, None] + columns)
        positions = np.arange(r.num_prompt - 1)[:, None]
        np.testing.assert_allclose(lps[1:], positions + columns / 10, rtol=1e-6)


def test_prompt_logprobs_follow_chunks_and_preemption(make) -> None:
    rng = np.random.default_rng(6)
    # Chunks of at most 6 tokens and too few blocks for everyone: prompts are scored
    # chunk by chunk, a preempted request is recomputed without scoring its prompt again.
    s, ex = make(num_blocks=10, max_batch_prefill_tokens=6, max_batch_size=4)
    reqs = [
        add(
            s,
            i,
            prompt_of(rng, int(rng.integers(2, 15))),
            max_new_tokens=20,
            prefill_logprobs=i % 2 == 0,
        )
        for i in range(6)
    ]
    trace = run_all(s, ex)
    assert s.stats.preemptions > 0
    check_outputs(trace, reqs)
    for r in reqs:
        key = (r.frontend, r.req_id)
        if not r.params.prefill_logprobs:
            assert key not in trace.prompt_logprobs
            continue
        prompt = r.tokens[: r.num_prompt]
        want = [np.nan] + [prompt[p + 1] * 1000.0 + p for p in range(r.num_prompt - 1)]
        np.testing.assert_array_equal(trace.prompt_logprobs[key], np.array(want, np.float32))
    # Scoring stops with the first generated token, recompute included.
    for plan, rs in trace.plans:
        for i, r in enumerate(rs):
            if plan.prompt_logprobs.counts[i]:
                assert plan.layout.context_lens[i] + plan.prompt_logprobs.counts[i] < r.num_prompt


# ---------------------------------------------------------------- prefix cache


def first_row(trace: Trace, req: Request) -> tuple[int, int]:
    """(context, query) of a request's first planned row."""
    for plan, rs in trace.plans:
        for i, r in enumerate(rs):
            if r is req:
                return int(plan.layout.context_lens[i]), int(plan.layout.query_lens[i])
    raise AssertionError("never planned")


def test_shared_prefixes_are_reused(make) -> None:
    rng = np.random.default_rng(7)
    s, ex = make(num_blocks=64, block_size=4)
    stem = prompt_of(rng, 22)  # 5 full blocks and 2 more tokens
    a = add(s, 1, np.concatenate([stem, prompt_of(rng, 3)]), max_new_tokens=5)
    trace = run_all(s, ex)
    later = [add(s, i, np.concatenate([stem, prompt_of(rng, 3)]), max_new_tokens=5) for i in (2, 3)]
    trace = run_all(s, ex, trace)
    check_outputs(trace, [a, *later])
    assert first_row(trace, a) == (0, 25)
    for r in later:
        assert first_row(trace, r) == (20, 5) and r.num_cached == 20  # whole blocks only
    assert s.stats.cache_hit_tokens == 40 and s.stats.admitted_tokens == 75


def test_a_burst_sharing_a_prefix_computes_it_once(make) -> None:
    rng = np.random.default_rng(10)
    s, ex = make(num_blocks=64, block_size=4, max_batch_prefill_tokens=64)
    stem = prompt_of(rng, 20)
    same = [
        add(s, i, np.concatenate([stem, prompt_of(rng, 2)]), max_new_tokens=3) for i in (1, 2, 3)
    ]
    other = add(s, 4, prompt_of(rng, 22), max_new_tokens=3)
    trace = Trace()
    step_once(s, ex, trace, lambda: None)
    # The first request computes the shared blocks; the others sharing them wait a
    # step (an unrelated request behind them does not).
    assert trace.plans[0][1] == [same[0], other]
    trace = run_all(s, ex, trace)
    check_outputs(trace, [*same, other])
    assert [first_row(trace, r) for r in same[1:]] == [(20, 2), (20, 2)]
    assert s.stats.cache_hit_tokens == 40


def test_waiting_served_ratio_and_max_waiting_tokens(make) -> None:
    rng = np.random.default_rng(11)
    s, ex = make(num_blocks=64, waiting_served_ratio=0.5, max_waiting_tokens=3)
    running = [add(s, i, prompt_of(rng, 3), max_new_tokens=12) for i in range(4)]
    trace = Trace()
    step_once(s, ex, trace, lambda: None)  # nobody runs yet: all four are admitted
    late = add(s, 9, prompt_of(rng, 3), max_new_tokens=2)
    # 1 waiting < 0.5 x 4 running: it waits 3 steps, then goes in anyway.
    for _ in range(3):
        step_once(s, ex, trace, lambda: None)
        assert late.status == Status.WAITING
    step_once(s, ex, trace, lambda: None)
    assert late.status != Status.WAITING
    # Two more waiting meet the ratio (2 >= 0.5 x 5) and go in at once.
    more = [add(s, 20 + i, prompt_of(rng, 3), max_new_tokens=2) for i in range(2)]
    step_once(s, ex, trace, lambda: None)
    assert all(r.status != Status.WAITING for r in more)
    check_outputs(run_all(s, ex, trace), [*running, late, *more])


def test_whole_cached_prompt_still_computes_a_token(make) -> None:
    s, ex = make(num_blocks=32, block_size=4)
    prompt = list(range(1, 17))  # exactly 4 blocks
    first = add(s, 1, prompt, max_new_tokens=3)
    trace = run_all(s, ex)
    again = add(s, 2, prompt, max_new_tokens=3)
    longer = add(s, 3, [*prompt, 99], max_new_tokens=3)
    trace = run_all(s, ex, trace)
    check_outputs(trace, [first, again, longer])
    assert first_row(trace, again) == (12, 4)  # the last block is recomputed, not shared
    assert first_row(trace, longer) == (16, 1)


def test_generated_tokens_are_cached_for_the_next_turn(make) -> None:
    s, ex = make(num_blocks=32, block_size=4)
    turn1 = add(s, 1, list(range(1, 9)), max_new_tokens=12)
    trace = run_all(s, ex)
    history = [*range(1, 9), *trace.tokens[(b"f0", 1)]]  # 20 tokens; 19 computed
    turn2 = add(s, 2, [*history, 7, 7], max_new_tokens=4)
    trace = run_all(s, ex, trace)
    check_outputs(trace, [turn1, turn2])
    assert first_row(trace, turn2) == (16, 6)


def test_adapters_never_share_cached_blocks(make) -> None:
    """A prompt's KV under one LoRA adapter is reused by that adapter only."""
    s, ex = make(num_blocks=32, block_size=4, lora_adapters=2, lora_slots=2)
    prompt = list(range(1, 18))  # 4 full blocks and one token
    first = add(s, 1, prompt, max_new_tokens=2, adapter=0)
    trace = run_all(s, ex)
    other = add(s, 2, prompt, max_new_tokens=2, adapter=1)
    base = add(s, 3, prompt, max_new_tokens=2)
    trace = run_all(s, ex, trace)
    same = add(s, 4, prompt, max_new_tokens=2, adapter=0)
    other_again = add(s, 5, prompt, max_new_tokens=2, adapter=1)
    trace = run_all(s, ex, trace)
    check_outputs(trace, [first, other, base, same, other_again])
    assert first_row(trace, other) == (0, 17)
    assert first_row(trace, base) == (0, 17)
    assert first_row(trace, same) == (16, 1)
    assert first_row(trace, other_again) == (16, 1)
    # The first block's key under each adapter and none: three distinct keys, each cached.
    block = np.array(prompt[:4], dtype=np.int32)
    keys = {s.pool.key(root, block) for root in (None, *s._cache_roots)}
    assert len(keys) == 3 and all(k in s.pool._cached for k in keys)


def test_fewer_slots_than_adapters_take_turns(make) -> None:
    """One slot, three adapters: requests wait for the slot (the checks in `step_once`
    hold each row to the adapter loaded in its slot), base-model rows run alongside."""
    s, ex = make(num_blocks=64, block_size=4, lora_adapters=3, lora_slots=1)
    rng = np.random.default_rng(5)
    reqs = [
        add(s, i, prompt_of(rng, 6), max_new_tokens=3 + i % 4, adapter=i % 4 - 1) for i in range(12)
    ]
    trace = run_all(s, ex)
    check_outputs(trace, reqs)
    loads = [int(p.lora.load_adapters.size) for p, _ in trace.plans]
    assert sum(loads) >= 3  # each adapter loaded at least once, one at a time
    assert all(len({r.params.adapter for r in rs} - {-1}) <= 1 for _, rs in trace.plans)


def test_unknown_adapter_index_is_refused(make_serial) -> None:
    s, _ = make_serial(lora_adapters=1, lora_slots=1)
    with pytest.raises(RequestRejected, match="no LoRA adapter 1"):
        add(s, 1, [1, 2, 3], adapter=1)


def test_cache_after_eviction_and_when_off(make) -> None:
    rng = np.random.default_rng(8)
    s, ex = make(num_blocks=12, block_size=4)
    prompt = prompt_of(rng, 16)
    reqs = [add(s, 1, prompt, max_new_tokens=4)]
    trace = run_all(s, ex)
    for i in range(2, 6):  # others fill the pool: the first prompt's blocks are evicted
        reqs.append(add(s, i, prompt_of(rng, 30), max_new_tokens=8))
        trace = run_all(s, ex, trace)
    reqs.append(again := add(s, 9, prompt, max_new_tokens=4))
    trace = run_all(s, ex, trace)
    check_outputs(trace, reqs)
    assert first_row(trace, again) == (0, 16)
    # Asking for prompt logprobs computes the whole prompt (and caches nothing).
    scored = add(s, 10, prompt, max_new_tokens=2, prefill_logprobs=True)
    trace = run_all(s, ex, trace)
    assert first_row(trace, scored) == (0, 16) and scored.num_cached == 0
    off, ex_off = make(num_blocks=12, block_size=4, prefix_caching=False)
    twice = [add(off, i, prompt, max_new_tokens=4) for i in (1, 2)]
    trace = run_all(off, ex_off)
    check_outputs(trace, twice)
    assert off.stats.cache_hit_tokens == 0 and off.pool.num_cached == 0


def test_hash_collisions_are_harmless_in_the_scheduler(make) -> None:
    rng = np.random.default_rng(9)
    s = Scheduler(SchedulerConfig(num_blocks=40, block_size=4), hash_fn=lambda parent, data: 7)
    ex = FakeExecutor(40, 4)
    stems = [prompt_of(rng, 12) for _ in range(3)]
    reqs = [
        add(s, i, np.concatenate([stems[i % 3], prompt_of(rng, 2)]), max_new_tokens=6)
        for i in range(9)
    ]
    trace = run_all(s, ex)
    check_outputs(trace, reqs)  # any wrong reuse would change the fake model's tokens
    assert s.stats.cache_hit_tokens > 0
    assert_drained(s)


def test_penalised_requests_get_their_cached_history(make) -> None:
    s, ex = make(num_blocks=32, block_size=4)
    prompt = list(range(1, 11))
    run_all(s, ex)
    add(s, 1, prompt, max_new_tokens=2)
    trace = run_all(s, ex)
    r = add(s, 2, prompt, max_new_tokens=2, repetition_penalty=1.3)
    trace = run_all(s, ex, trace)
    plan, rs = next((p, rs) for p, rs in trace.plans if r in rs)
    i = rs.index(r)
    assert plan.layout.context_lens[i] == 8 and plan.penalties.history_counts[i] == 8
    assert plan.penalties.history_ids.tolist() == prompt[:8]
    later = [p for p, rs in trace.plans if r in rs][1:]
    assert later and all(p.penalties.history_counts.sum() == 0 for p in later)  # sent once


# ---------------------------------------------------------------- aborts


def test_abort_waiting_and_running(make_serial) -> None:
    rng = np.random.default_rng(6)
    s, ex = make_serial(num_blocks=64, max_batch_size=1)
    running = add(s, 1, prompt_of(rng, 9), max_new_tokens=50)
    waiting = add(s, 2, prompt_of(rng, 9), max_new_tokens=50)
    kept = add(s, 3, prompt_of(rng, 9), max_new_tokens=5)
    trace = Trace()
    for _ in range(3):
        assert step_once(s, ex, trace, lambda: None)
    assert running.status == Status.RUNNING and running.block_ids
    assert waiting.status == Status.WAITING
    s.abort(b"f0", 1)
    s.abort(b"f0", 2)
    s.abort(b"f0", 99)  # unknown: ignored
    s.abort(b"other", 3)  # same id, other frontend: not this request
    step, ended = s.schedule()  # aborts take effect here, before planning
    assert {(o.req.req_id, o.token, o.finish) for o in ended} == {
        (1, -1, FinishReason.ABORTED),
        (2, -1, FinishReason.ABORTED),
    }
    assert step is not None and step.reqs == [kept]  # the freed slot went to the next one
    for out in ended:
        trace.saw(out.req.frontend, out.req.req_id, out.token, out.finish)
    for out in s.update(step, ex.step(step.plan)):
        trace.saw(out.req.frontend, out.req.req_id, out.token, out.finish)
    assert trace.finish[(b"f0", 1)] == FinishReason.ABORTED
    assert trace.finish[(b"f0", 2)] == FinishReason.ABORTED
    assert (b"f0", 2) not in trace.tokens  # never ran, so no token, only the finish
    assert running.block_ids == [] and waiting.status == Status.FINISHED
    check_bookkeeping(s)  # the aborted request's blocks are free or owned by `kept` alone
    want, _ = reference(running.tokens[:9], running.params, frozenset())
    assert trace.tokens[(b"f0", 1)] == want[:3]
    run_all(s, ex, trace)
    check_outputs(trace, [kept])


def test_abort_while_step_in_flight(make_serial) -> None:
    """An abort between plan and result takes effect after the step's tokens are applied."""
    rng = np.random.default_rng(7)
    s, ex = make_serial()
    a = add(s, 1, prompt_of(rng, 5), max_new_tokens=10)
    b = add(s, 2, prompt_of(rng, 5), max_new_tokens=10)
    trace = Trace()
    step_once(s, ex, trace, lambda: None)
    step_once(s, ex, trace, lambda: s.abort(b"f0", 1))
    assert a.status == Status.RUNNING  # still: the step in flight completes for it
    assert len(trace.tokens[(b"f0", 1)]) == 2
    run_all(s, ex, trace)
    assert trace.finish[(b"f0", 1)] == FinishReason.ABORTED
    assert len(trace.tokens[(b"f0", 1)]) == 2
    check_outputs(trace, [b])


def test_abort_after_finish_is_ignored(make_serial) -> None:
    s, ex = make_serial()
    r = add(s, 1, [1, 2, 3], max_new_tokens=2)
    trace = Trace()
    step_once(s, ex, trace, lambda: None)
    step_once(s, ex, trace, lambda: s.abort(b"f0", 1))  # finishes by LENGTH in this step
    run_all(s, ex, trace)
    check_outputs(trace, [r])


def test_row_finished_mid_step_does_not_shift_tokens(make_serial) -> None:
    """White-box: if a request ends while its step is in flight (today only `_finish` can do
    that), the sampled tokens of the rows after it must still go to the right requests."""
    rng = np.random.default_rng(8)
    s, ex = make_serial()
    a = add(s, 1, prompt_of(rng, 5), max_new_tokens=10)
    b = add(s, 2, prompt_of(rng, 5), max_new_tokens=10)
    trace = Trace()
    step_once(s, ex, trace, lambda: s._finish(a, FinishReason.ABORTED))
    assert (b"f0", 1) not in trace.tokens
    run_all(s, ex, trace)
    check_outputs(trace, [b])


def eos_at(length: int) -> TokenFn:
    """A model that says EOS once the history reaches `length` tokens."""
    return lambda h: EOS if len(h) == length else hash_token(h)


def test_eos_finishes(make) -> None:
    fn = eos_at(7)
    s, ex = make(fn=fn, eos_token_ids=frozenset({EOS}))
    r = add(s, 1, [1, 2, 3, 4], max_new_tokens=20)
    trace = run_all(s, ex)
    assert trace.finish[(b"f0", 1)] == FinishReason.EOS
    assert trace.tokens[(b"f0", 1)] == [
        *reference(r.tokens[:4], r.params, frozenset(), fn)[0][:3],
        EOS,
    ]


def test_ignore_eos_runs_to_length(make) -> None:
    fn = eos_at(7)
    s, ex = make(fn=fn, eos_token_ids=frozenset({EOS}))
    add(s, 1, [1, 2, 3, 4], max_new_tokens=6, ignore_eos=True)
    trace = run_all(s, ex)
    assert trace.finish[(b"f0", 1)] == FinishReason.LENGTH
    toks = trace.tokens[(b"f0", 1)]
    assert len(toks) == 6 and toks[3] == EOS


def test_stop_token_ids(make) -> None:
    prompt = np.array([9, 8, 7], dtype=np.int32)
    ref, _ = reference(prompt, SamplingParams(max_new_tokens=10), frozenset())
    stop = ref[4]
    assert stop not in ref[:4]
    s, ex = make()
    add(s, 1, prompt, max_new_tokens=10, stop_token_ids=(12345, stop))
    trace = run_all(s, ex)
    assert trace.tokens[(b"f0", 1)] == ref[:5]
    assert trace.finish[(b"f0", 1)] == FinishReason.STOP_SEQUENCE


@pytest.mark.parametrize("max_new", [1, 2, 9])
def test_max_new_tokens_length(make, max_new: int) -> None:
    s, ex = make()
    r = add(s, 1, [3, 1, 4, 1, 5], max_new_tokens=max_new)
    trace = run_all(s, ex)
    assert len(trace.tokens[(b"f0", 1)]) == max_new
    check_outputs(trace, [r])


# ---------------------------------------------------------------- admission


def test_rejections(make) -> None:
    s, ex = make(num_blocks=4, block_size=4)  # 16 tokens of KV
    assert s.capacity_tokens == 16
    with pytest.raises(RequestRejected, match="exceeds the KV cache capacity"):
        add(s, 1, list(range(1, 11)), max_new_tokens=7)
    with pytest.raises(RequestRejected, match="empty"):
        add(s, 2, [], max_new_tokens=1)
    with pytest.raises(RequestRejected, match="max_new_tokens"):
        add(s, 3, [1], max_new_tokens=0)
    exact = add(s, 4, list(range(1, 11)), max_new_tokens=6)  # exactly the capacity: fits
    with pytest.raises(RequestRejected, match="already in use"):
        add(s, 4, [1, 2], max_new_tokens=1)
    other = add(s, 4, [1, 2], frontend=b"f1", max_new_tokens=2)  # ids are per frontend
    assert len(s.requests) == 2 and s.pool.num_free == 4  # rejections took nothing
    check_outputs(run_all(s, ex), [exact, other])
    add(s, 4, [1, 2], max_new_tokens=1)  # a finished request's id may be reused
    run_all(s, ex)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"top_k": 3_000_000_000}, "top_k"),  # issue 15: the int32 column of the plan
        ({"top_k": -1}, "top_k"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 1e39}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"typical_p": 1.5}, "typical_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"frequency_penalty": float("inf")}, "frequency_penalty"),
        ({"top_n_tokens": VOCAB + 1}, "top_n_tokens"),
        ({"seed": 2**63}, "seed"),
        ({"logit_bias": ((VOCAB, 1.0),)}, "outside the vocabulary"),
        ({"logit_bias": ((5, float("inf")),)}, "logit_bias values"),
        ({"stop_token_ids": (-1,)}, "outside the vocabulary"),
    ],
)
def test_admission_refuses_what_the_plan_cannot_carry(make, params: dict, match: str) -> None:
    s, _ = make(vocab_size=VOCAB)
    with pytest.raises(RequestRejected, match=match):
        add(s, 1, [1, 2, 3], max_new_tokens=2, **params)
    assert not s.has_work() and s.pool.num_free == s.pool.num_blocks


def test_a_request_whose_plan_breaks_fails_alone(make, monkeypatch) -> None:
    """Defence in depth behind admission: a row that breaks the plan builder ends that
    request alone (an error, its blocks freed); the others run to their reference."""
    import tgi_mp.scheduler.scheduler as scheduler

    s, ex = make()
    bad = add(s, 1, [5, 6, 7], max_new_tokens=3)
    good = [add(s, i, list(range(1, 2 + i)), max_new_tokens=4) for i in (2, 3)]
    real = scheduler.build_step_plan

    def breaks_on_bad(step_id, reqs, num_new, released, eos_ids):
        if any(r is bad for r in reqs):
            raise OverflowError("a column does not fit")
        return real(step_id, reqs, num_new, released, eos_ids)

    monkeypatch.setattr(scheduler, "build_step_plan", breaks_on_bad)
    step, ended = s.schedule()
    assert step is None
    assert [(o.req, o.finish, o.error) for o in ended] == [
        (bad, FinishReason.ERROR, "OverflowError: a column does not fit")
    ]
    assert bad.status == Status.FINISHED and not bad.block_ids
    check_outputs(run_all(s, ex), good)


def test_a_request_whose_update_breaks_fails_alone(make_serial) -> None:
    s, ex = make_serial()
    bad = add(s, 1, [5, 6, 7], max_new_tokens=3)
    good = [add(s, i, list(range(1, 2 + i)), max_new_tokens=4) for i in (2, 3)]
    trace = Trace()
    step_once(s, ex, trace, lambda: None)  # every prompt computed, first tokens out
    bad.tokens = bad.tokens[: bad.num_tokens]  # its next append breaks (an IndexError)
    step, _ = s.schedule()
    outs = s.update(step, ex.step(step.plan))
    failed = [o for o in outs if o.error is not None]
    assert [(o.req, o.finish) for o in failed] == [(bad, FinishReason.ERROR)]
    assert "IndexError" in failed[0].error and bad.status == Status.FINISHED
    for out in outs:
        if out.error is None:
            trace.saw(out.req.frontend, out.req.req_id, out.token, out.finish)
    check_bookkeeping(s)
    check_outputs(run_all(s, ex, trace), good)


# ---------------------------------------------------------------- stress


def test_randomized_stress(make) -> None:
    seed = 1234
    rng = np.random.default_rng(seed)
    pyrng = random.Random(seed)
    vocab = 50  # small: EOS (0) and stop tokens come up by themselves

    def fn(history: np.ndarray) -> int:
        return hash_token(history) % vocab

    eos = frozenset({EOS})
    s, ex = make(
        num_blocks=24, fn=fn, max_batch_prefill_tokens=20, max_batch_size=12, eos_token_ids=eos
    )
    pending: list[tuple[int, bytes, int, np.ndarray, SamplingParams]] = []
    stems = [prompt_of(rng, 40) for _ in range(3)]  # shared prefixes: the cache gets hits
    for i in range(200):
        n_prompt = int(rng.integers(1, 50))
        params = SamplingParams(
            max_new_tokens=int(rng.integers(1, min(40, 96 - n_prompt))),
            ignore_eos=bool(rng.random() < 0.5),
            stop_token_ids=tuple(int(t) for t in rng.integers(1, vocab, int(rng.integers(0, 2)))),
            seed=i,
        )
        # Two frontends with overlapping request ids.
        prompt = prompt_of(rng, n_prompt)
        if rng.random() < 0.6:
            stem = stems[int(rng.integers(0, 3))]
            prompt = np.concatenate([stem[: min(n_prompt, 40)], prompt])[:n_prompt]
        pending.append((i // 2, b"f%d" % (i % 2), int(rng.integers(0, 400)), prompt, params))
    reqs: list[Request] = []
    aborted: set[tuple[bytes, int]] = set()

    def maybe_abort() -> None:
        live = [r for r in reqs if r.status != Status.FINISHED]
        if live and pyrng.random() < 0.1:
            r = pyrng.choice(live)
            s.abort(r.frontend, r.req_id)
            aborted.add((r.frontend, r.req_id))

    def before(step: int) -> None:
        for req_id, frontend, at, prompt, params in pending:
            if at == step:
                reqs.append(s.add(AddRequest(req_id, prompt, params), frontend))
        maybe_abort()

    trace = Trace()
    for step in range(401):
        before(step)
        step_once(s, ex, trace, maybe_abort)
    run_all(s, ex, trace, between=maybe_abort)

    assert len(reqs) == 200 and s.stats.preemptions > 0
    assert s.stats.cache_hit_tokens > 500, s.stats
    reasons = set()
    for r in reqs:
        key = (r.frontend, r.req_id)
        want, want_reason = reference(r.tokens[: r.num_prompt], r.params, eos, fn)
        got, reason = trace.tokens.get(key, []), trace.finish[key]
        reasons.add(reason)
        if reason == FinishReason.ABORTED:
            assert key in aborted and got == want[: len(got)]
        else:
            assert (got, reason) == (want, want_reason), key
    assert reasons == set(FinishReason) - {FinishReason.ERROR}


# ---------------------------------------------------------------- speculative decoding


def test_ngram_proposal_follows_the_most_recent_longest_match() -> None:
    from tgi_mp.scheduler.speculation import ngram_proposal

    t = np.array([5, 6, 7, 8, 9, 1, 6, 7, 3, 4, 6, 7], dtype=np.int32)
    # Suffix (6, 7) last occurred before at 6..7: what followed it was 3, 4, 6.
    assert ngram_proposal(t, 3, 3, 1).tolist() == [3, 4, 6]
    assert ngram_proposal(t, 1, 3, 1).tolist() == [3]
    # (9, 6, 7) never occurred: the longest match wins over a more recent shorter one.
    t2 = np.array([1, 2, 3, 9, 2, 3, 7, 1, 2, 3], dtype=np.int32)
    assert ngram_proposal(t2, 2, 3, 1).tolist() == [9, 2]
    assert ngram_proposal(t2, 2, 3, 3).tolist() == [9, 2]
    assert ngram_proposal(np.array([1, 2, 3], dtype=np.int32), 4, 3, 1).tolist() == []
    assert ngram_proposal(t, 0, 3, 1).tolist() == []


@pytest.mark.parametrize("drafted", [False, True], ids=["ngram", "draft"])
def test_speculation_randomized(make, drafted: bool) -> None:
    """Proposals accepted and rejected at random (a 'model' that often repeats itself;
    n-gram lookup, or a draft model that guesses it right 3 times in 4), with
    preemption, aborts, stops, the prefix cache and a small budget: every request's
    tokens are its reference's, nothing is emitted after a finish, and every block ends
    free (the fixture) with none held twice or past what was computed (every step)."""
    seed = 99
    rng = np.random.default_rng(seed)
    pyrng = random.Random(seed)
    vocab = 40

    def fn(history: np.ndarray) -> int:
        h = hash_token(history)
        return int(history[-3]) if h % 3 and len(history) >= 3 else h % vocab

    def guess(history: np.ndarray) -> int:
        right = fn(history)
        return right if hash_token(history[::-1]) % 4 else (right + 1) % vocab

    eos = frozenset({EOS})
    s, ex = make(
        num_blocks=30,
        fn=fn,
        max_batch_prefill_tokens=24,
        max_batch_size=8,
        eos_token_ids=eos,
        speculate=4,
        speculate_max_batch=8,
        **({"draft": guess} if drafted else {}),
    )
    reqs: list[Request] = []
    arrivals = {}
    for i in range(80):
        params = SamplingParams(
            max_new_tokens=int(rng.integers(1, 40)),
            ignore_eos=bool(rng.random() < 0.7),
            stop_token_ids=tuple(int(t) for t in rng.integers(1, vocab, int(rng.integers(0, 2)))),
            seed=i,
        )
        prompt = rng.integers(1, vocab, int(rng.integers(2, 30)), dtype=np.int32)
        arrivals.setdefault(int(rng.integers(0, 150)), []).append((i, prompt, params))
    aborted: set[tuple[bytes, int]] = set()

    def maybe_abort() -> None:
        live = [r for r in reqs if r.status != Status.FINISHED]
        if live and pyrng.random() < 0.05:
            r = pyrng.choice(live)
            s.abort(r.frontend, r.req_id)
            aborted.add((r.frontend, r.req_id))

    def before(step: int) -> None:
        for req_id, prompt, params in arrivals.get(step, []):
            reqs.append(s.add(AddRequest(req_id, prompt, params), b"f0"))

    trace = Trace()
    for step in range(151):
        before(step)
        step_once(s, ex, trace, maybe_abort)
    run_all(s, ex, trace, between=maybe_abort)

    assert len(reqs) == 80
    st = s.stats
    assert st.spec_accepted_tokens > 50 and st.spec_proposed_tokens > st.spec_accepted_tokens, st
    assert st.preemptions > 0, st
    for r in reqs:
        key = (r.frontend, r.req_id)
        want, want_reason = reference(r.tokens[: r.num_prompt], r.params, eos, fn)
        got, reason = trace.tokens.get(key, []), trace.finish[key]
        if reason == FinishReason.ABORTED:
            assert key in aborted and got == want[: len(got)]
        else:
            assert (got, reason) == (want, want_reason), key


def test_min_tokens_holds_eos_and_stop_ids_back(make) -> None:
    """Until `min_tokens` are generated a row's bias is -inf on EOS and its stop ids (the
    sampler then cannot end it early); from then on, only its own logit bias."""
    s, ex = make(num_blocks=32, block_size=4, eos_token_ids=frozenset({2}))
    held = add(s, 1, [5, 6, 7], max_new_tokens=6, min_tokens=3, stop_token_ids=(9,))
    free = add(s, 2, [5, 6, 8], max_new_tokens=3, logit_bias=((4, 1.5),))
    trace = run_all(s, ex)
    check_outputs(trace, [held, free])
    seen = []
    for plan, reqs in trace.plans:
        at = np.cumsum(plan.bias.counts) - plan.bias.counts
        for i, r in enumerate(reqs):
            entries = slice(at[i], at[i] + plan.bias.counts[i])
            ids, values = plan.bias.ids[entries].tolist(), plan.bias.values[entries].tolist()
            got = dict(zip(ids, values, strict=True))
            if r is held and plan.sampling.sample[i]:
                index = int(plan.sampling.sample_index[i])
                seen.append(index)
                assert got == ({2: -np.inf, 9: -np.inf} if index < 3 else {}), index
            if r is free:
                assert got == {4: 1.5}
    assert sorted(seen) == list(range(6))
