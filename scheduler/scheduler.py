"""Which tokens are computed next: admission, chunked prefill, preemption.

One token budget per step (`max_batch_prefill_tokens`) and no phases: running
requests are served first (a decode token each, or the next chunk of a
prompt still being prefilled), then waiting requests are admitted in arrival
order into what is left, the last one chunked to fit. When KV blocks run out
the most recently admitted running request is preempted: its blocks are freed
and it goes back to the head of the queue, to be recomputed later from its
tokens (prompt and everything it generated), which the client never sees.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from tgi_mp.ipc.messages import AddRequest, FinishReason, StepPlan
from tgi_mp.options import CUDA_STEP_TOKENS, DEFAULTS, sequences_per_step
from tgi_mp.scheduler.admission import RequestRejected, request_problem
from tgi_mp.scheduler.block_pool import BlockKey, BlockPool, HashFn, chain_hash
from tgi_mp.scheduler.grammar import Grammars, GrammarUnavailable
from tgi_mp.scheduler.lora_slots import AdapterSlots
from tgi_mp.scheduler.request import Request, Status
from tgi_mp.scheduler.speculation import can_speculate, ngram_proposal
from tgi_mp.scheduler.step_plan import Output, ScheduledStep, build_step_plan

log = logging.getLogger("tgi_mp.scheduler")


@dataclass(frozen=True)
class SchedulerConfig:
    """The engine options the policy reads (defaults and meaning: `tgi_mp.options`)."""

    num_blocks: int
    block_size: int = 16
    max_batch_prefill_tokens: int = CUDA_STEP_TOKENS  # resolved for the device by main
    max_batch_size: int | None = DEFAULTS["max_batch_size"]
    eos_token_ids: frozenset[int] = frozenset()
    vocab_size: int | None = None  # when known, token ids outside it are refused
    prefix_caching: bool = DEFAULTS["prefix_caching"]
    # TGI's batch-growth rule, off unless set (TGI ignores it when prefill is chunked, as
    # it always is here): while requests run, admit new ones only when at least
    # ratio x running are waiting, or after `max_waiting_tokens` steps without admitting.
    waiting_served_ratio: float | None = DEFAULTS["waiting_served_ratio"]
    max_waiting_tokens: int = DEFAULTS["max_waiting_tokens"]
    # Speculative decoding (n-gram proposals, scheduler/speculation.py): up to this many
    # proposals per decoding request a step, while at most `speculate_max_batch` run.
    speculate: int = DEFAULTS["speculate"]
    speculate_ngram_max: int = DEFAULTS["speculate_ngram_max"]
    speculate_ngram_min: int = DEFAULTS["speculate_ngram_min"]
    speculate_max_batch: int = DEFAULTS["speculate_max_batch"]
    # The executors' draft model proposes instead: the plan reserves the proposals'
    # positions (placeholders the executors fill) and the scheduler only counts them.
    speculate_draft: bool = False
    # LoRA (scheduler/lora_slots.py): adapters configured, and how many are resident.
    lora_adapters: int = 0
    lora_slots: int = 0

    @property
    def sequences_per_step(self) -> int:
        return sequences_per_step(self.max_batch_size, self.max_batch_prefill_tokens)


@dataclass
class Stats:
    steps: int = 0
    preemptions: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    admitted_tokens: int = 0  # tokens of admitted (and re-admitted) requests
    # steps that admitted n requests, by n (TGI's "next batch size")
    admissions: dict[int, int] = field(default_factory=dict)
    cache_hit_tokens: int = 0  # of which served from the prefix cache
    spec_proposed_tokens: int = 0  # proposals verified (of requests still running then)
    spec_accepted_tokens: int = 0  # of which the target agreed with


class Scheduler:
    def __init__(
        self, cfg: SchedulerConfig, hash_fn: HashFn = chain_hash, grammars: Grammars | None = None
    ) -> None:
        self.cfg = cfg
        self.grammars = grammars  # None: requests with a grammar are refused
        self.pool = BlockPool(cfg.num_blocks, cfg.block_size, hash_fn)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[tuple[bytes, int], Request] = {}
        self._aborts: list[Request] = []
        self._building: list[Request] = []  # waiting for their grammar matcher
        self._released: list[int] = []  # seq ids finished since the last plan
        self._seq_ids = 0
        self._step_id = 0
        self._steps_without_admission = 0
        self.stats = Stats()
        self.lora = AdapterSlots(cfg.lora_slots) if cfg.lora_slots else None
        # The prefix cache's chain for each adapter starts at its own root: KV computed
        # under one adapter is never served to another (nor to the base model).
        self._cache_roots = [
            self.pool.key(None, np.array([-1, a], dtype=np.int32)) for a in range(cfg.lora_adapters)
        ]

    @property
    def capacity_tokens(self) -> int:
        return self.cfg.num_blocks * self.cfg.block_size

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._aborts)

    def building_matchers(self) -> bool:
        """Whether a waiting request's grammar matcher is still being built."""
        return bool(self._building)

    # ------------------------------------------------------------ requests in

    def add(self, msg: AddRequest, frontend: bytes = b"") -> Request:
        key = (frontend, msg.req_id)
        p = msg.params
        if key in self.requests:
            raise RequestRejected(f"request id {msg.req_id} is already in use")
        if problem := request_problem(msg.prompt, p, self.cfg.vocab_size, self.capacity_tokens):
            raise RequestRejected(problem)
        if not -1 <= p.adapter < self.cfg.lora_adapters:
            raise RequestRejected(
                f"no LoRA adapter {p.adapter} (this engine has {self.cfg.lora_adapters})"
            )
        seed = p.seed if p.seed is not None else random.getrandbits(63)
        pending = None
        if p.grammar is not None:
            if self.grammars is None:
                raise RequestRejected("grammar is not supported by this engine")
            try:
                pending = self.grammars.compile(p.grammar)
            except GrammarUnavailable as e:
                raise RequestRejected(str(e)) from None
        self._seq_ids += 1
        req = Request(msg.req_id, frontend, msg.prompt, p, seed, self._seq_ids)
        req.cache_root = self._cache_roots[p.adapter] if p.adapter >= 0 else None
        req.pending_matcher = pending
        if pending is not None:
            self._building.append(req)
        self.requests[key] = req
        self.waiting.append(req)
        return req

    def abort(self, frontend: bytes, req_id: int) -> None:
        """Takes effect at the next `schedule`, so an in-flight step stays consistent."""
        req = self.requests.get((frontend, req_id))
        if req is not None and req.status != Status.FINISHED:
            self._aborts.append(req)

    # ------------------------------------------------------------ planning

    def schedule(self) -> tuple[ScheduledStep | None, list[Output]]:
        """Plans the next step; also returns requests that ended outside a step."""
        ended = [
            self._finish(r, FinishReason.ABORTED)
            for r in self._aborts
            if r.status != Status.FINISHED
        ]
        self._aborts.clear()
        ended += self._matchers_built()
        reqs: list[Request] = []
        num_new: list[int] = []
        budget, preempted = self._serve_running(reqs, num_new)
        if not preempted:  # if anyone was, admit nobody new this step
            self._admit_waiting(reqs, num_new, budget)
        if not reqs:
            return None, ended
        prefill_before = self.stats.prefill_tokens
        try:
            plan = self._plan(reqs, num_new)
        except Exception:
            # One request's columns broke the plan: fail that one, plan the rest next time.
            for req in reqs:
                req.num_proposed = 0
            return None, ended + self._fail_unplannable(reqs, num_new)
        decode_only = self.stats.prefill_tokens == prefill_before
        return ScheduledStep(plan, reqs, num_new, decode_only), ended

    def _matchers_built(self) -> list[Output]:
        """Waiting requests whose grammar matcher is ready take it; those whose grammar
        failed to build end with the error."""
        failed, still = [], []
        for req in self._building:
            if req.status == Status.FINISHED:  # aborted meanwhile
                continue
            if not req.pending_matcher.done():
                still.append(req)
                continue
            future, req.pending_matcher = req.pending_matcher, None
            try:
                req.matcher = future.result()
            except Exception as e:
                failed.append(self._fail(req, e))
        self._building = still
        return failed

    def _serve_running(self, reqs: list[Request], num_new: list[int]) -> tuple[int, bool]:
        """A decode token, or the next prompt chunk, for each running request in order,
        preempting from the tail when blocks run out: (budget left, whether anyone was
        preempted)."""
        budget = self.cfg.max_batch_prefill_tokens
        preempted = False
        speculating = 0 < len(self.running) <= self.cfg.speculate_max_batch and self.cfg.speculate
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            # Free the tail of `running` until at least one token fits, or this is the tail.
            while self._room(req) == 0 and req.status == Status.RUNNING:
                self._preempt(self.running[-1])
                preempted = True
            if req.status != Status.RUNNING:
                break
            if req.num_pending and req.num_generated + req.num_pending >= req.params.max_new_tokens:
                i += 1  # the step in flight gives its last token: nothing more to compute
                continue
            if req.spec_inflight or (speculating and req.num_pending and can_speculate(req)):
                # Its next proposals need the tokens the step in flight accepts: it waits
                # for them (one step at a time while it speculates; others overlap).
                i += 1
                continue
            # A prompt chunk shrinks to the room left rather than preempt anyone.
            n = min(req.planned_tokens - req.planned_computed, budget, self._room(req))
            if speculating and n == 1 and req.num_generated and can_speculate(req):
                # Proposals never take the block a request after this one needs for its
                # own next token: they must not cause a preemption.
                others = (len(self.running) - i - 1) * self.cfg.block_size
                n += self._propose(req, min(budget - 1, self._room(req) - 1 - others))
            self._reserve(req, n)
            reqs.append(req)
            num_new.append(n)
            budget -= n
            i += 1
        return budget, preempted

    def _propose(self, req: Request, room: int) -> int:
        """Puts proposals for a decoding request's next tokens after its last one (in
        `tokens`, past `num_tokens`): how many. n-gram lookup finds them here; for a
        draft model they are placeholders (0) that the executors fill."""
        cfg = self.cfg
        k = min(cfg.speculate, room, req.params.max_new_tokens - req.num_generated - 1)
        if cfg.speculate_draft:
            proposal = np.zeros(max(k, 0), dtype=np.int32)
        else:
            proposal = ngram_proposal(
                req.tokens[: req.num_tokens], k, cfg.speculate_ngram_max, cfg.speculate_ngram_min
            )
        req.tokens[req.num_tokens : req.num_tokens + len(proposal)] = proposal
        req.num_proposed = len(proposal)
        return len(proposal)

    def _admit_waiting(self, reqs: list[Request], num_new: list[int], budget: int) -> None:
        """Waiting requests in arrival order into what is left of the budget, the last
        one chunked to fit."""
        # Full blocks this step computes: a waiting request whose next block is among them
        # waits a step and then reuses it (the `n` choices of one prompt, a burst of
        # requests sharing a system prompt) instead of computing it twice.
        computing = self._blocks_in_flight(reqs, num_new) if self.waiting else set()
        adapters_in_use: set[int] | None = None  # of the running requests, when needed
        deferred: list[Request] = []
        admitted = 0
        grow = self._may_grow()  # decided once for the step, as TGI sizes a new batch
        while grow and self.waiting and budget > 0:
            if len(self.running) >= self.cfg.sequences_per_step:
                break
            req = self.waiting.popleft()
            if req.pending_matcher is not None:  # its grammar is still being built
                deferred.append(req)
                continue
            if req.params.adapter >= 0:
                if adapters_in_use is None:
                    adapters_in_use = {r.params.adapter for r in self.running}
                if not self.lora.place(req.params.adapter, adapters_in_use):
                    deferred.append(req)  # every slot serves running requests
                    continue
                adapters_in_use.add(req.params.adapter)
            self._reuse_prefix(req)
            if computing and self._next_key(req) in computing:
                self._drop_blocks(req)
                deferred.append(req)
                continue
            n = min(req.num_tokens - req.num_computed, budget)
            if not self._reserve(req, n):
                self._drop_blocks(req)
                self.waiting.appendleft(req)
                break
            self.stats.admitted_tokens += req.num_tokens
            self.stats.cache_hit_tokens += req.num_cached
            req.status = Status.RUNNING
            self.running.append(req)
            reqs.append(req)
            num_new.append(n)
            budget -= n
            admitted += 1
            computing |= self._blocks_in_flight([req], [n])
        self.waiting.extendleft(reversed(deferred))
        self._steps_without_admission = 0 if admitted else self._steps_without_admission + 1
        if admitted:
            self.stats.admissions[admitted] = self.stats.admissions.get(admitted, 0) + 1

    def _may_grow(self) -> bool:
        ratio = self.cfg.waiting_served_ratio
        if ratio is None or not self.running:
            return True
        if self._steps_without_admission >= self.cfg.max_waiting_tokens:
            return True
        return len(self.waiting) >= int(len(self.running) * ratio)

    def _room(self, req: Request) -> int:
        """Tokens `req` can still add: the rest of its last block plus every free block."""
        free = (len(req.block_ids) + self.pool.num_free) * self.cfg.block_size
        return free - req.planned_computed

    def _reserve(self, req: Request, n: int) -> bool:
        """Makes sure `req` owns blocks for its next `n` tokens."""
        need = self.pool.blocks_for(req.planned_computed + n) - len(req.block_ids)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        req.block_ids += self.pool.allocate(need)
        return True

    def _reuse_prefix(self, req: Request) -> None:
        """Starts a request being admitted on its longest cached prefix. At least one
        token is always left to compute (its logits give the next token). Requests
        that want prompt logprobs compute their whole prompt, as in TGI."""
        if not self._caching(req):
            return
        blocks, keys = self.pool.match(
            req.tokens[: req.num_tokens],
            (req.num_tokens - 1) // self.cfg.block_size,
            req.cache_root,
        )
        self.pool.share(blocks)
        req.block_ids, req.block_keys = blocks, keys
        req.num_computed = req.num_cached = len(blocks) * self.cfg.block_size

    def _caching(self, req: Request) -> bool:
        return self.cfg.prefix_caching and not req.params.prefill_logprobs

    def _next_key(self, req: Request) -> BlockKey | None:
        """The key of the block after `req`'s reused prefix, when its prompt fills it."""
        bs, i = self.cfg.block_size, len(req.block_keys)
        if not self._caching(req) or (i + 1) * bs > req.num_tokens - 1:
            return None
        parent = req.block_keys[-1] if i else req.cache_root
        return self.pool.key(parent, req.tokens[i * bs : (i + 1) * bs])

    def _blocks_in_flight(self, reqs: list[Request], num_new: list[int]) -> set[BlockKey]:
        """Keys of the blocks that these rows fill this step."""
        if not self.cfg.prefix_caching:
            return set()
        bs, keys = self.cfg.block_size, set()
        for req, n in zip(reqs, num_new, strict=True):
            if not self._caching(req):
                continue
            parent = req.block_keys[-1] if req.block_keys else req.cache_root
            # Only blocks of known tokens (not one still being sampled) have a key.
            for i in range(
                len(req.block_keys), min(req.planned_computed + n, req.num_tokens) // bs
            ):
                parent = self.pool.key(parent, req.tokens[i * bs : (i + 1) * bs])
                keys.add(parent)
        return keys

    def _drop_blocks(self, req: Request) -> None:
        self.pool.release(req.block_ids)
        req.block_ids, req.block_keys = [], []
        req.num_computed = 0
        req.reset_inflight()
        req.started = False

    def _cache_full_blocks(self, req: Request) -> None:
        """Offers the blocks that are now full of computed tokens to the prefix cache."""
        bs = self.cfg.block_size
        for i in range(len(req.block_keys), req.num_computed // bs):
            parent = req.block_keys[-1] if req.block_keys else req.cache_root
            key = self.pool.key(parent, req.tokens[i * bs : (i + 1) * bs])
            self.pool.cache(req.block_ids[i], key)
            req.block_keys.append(key)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._drop_blocks(req)
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        self.stats.preemptions += 1

    def _plan(self, reqs: list[Request], num_new: list[int]) -> StepPlan:
        released = np.array(self._released, dtype=np.int64)
        eos = self.cfg.eos_token_ids
        plan = build_step_plan(self._step_id + 1, reqs, num_new, released, eos)
        if self.lora is not None:
            plan.lora = self.lora.columns(reqs)
        self._step_id += 1
        self._released = []
        row = 0
        for req, n, sampled in zip(reqs, num_new, plan.sampling.sample.tolist(), strict=True):
            # Decode = the one token sampled last step; a preempted request's recompute
            # of its generated tokens is prefill work. Counted as planned: a row the step
            # in flight makes moot (its request finished) was computed all the same.
            last = req.num_tokens + req.num_pending - 1  # the last token, known or not
            if req.num_generated + req.num_pending and req.planned_computed == last:
                self.stats.decode_tokens += n
            else:
                self.stats.prefill_tokens += n
            req.started = True  # their first plan carried their cached-prefix history
            req.num_inflight += n
            req.inflight_row = row if sampled else -1
            if sampled:
                req.num_pending += 1
                row += 1
            if req.num_proposed:  # the plan has them: from now on the step in flight does
                req.spec_inflight = True
                req.num_proposed = 0
        return plan

    def _fail_unplannable(self, reqs: list[Request], num_new: list[int]) -> list[Output]:
        """The requests whose own plan fails, each failed alone. None of them: the batch
        is broken as a whole (a bug, not a request), and that is raised."""
        failed = []
        for req, n in zip(reqs, num_new, strict=True):
            try:
                build_step_plan(0, [req], [n], np.empty(0, np.int64), self.cfg.eos_token_ids)
            except Exception as e:
                failed.append(self._fail(req, e))
        if not failed:
            raise RuntimeError("a step plan failed, and no request's plan fails alone")
        return failed

    def _fail(self, req: Request, e: Exception) -> Output:
        """Ends one request the engine could not serve; its blocks are freed."""
        log.error("request %d (sequence %d) failed: %r", req.req_id, req.seq_id, e, exc_info=e)
        out = self._finish(req, FinishReason.ERROR)
        out.error = f"{type(e).__name__}: {e}"
        return out

    # ------------------------------------------------------------ results in

    def update(
        self,
        step: ScheduledStep,
        sampled: np.ndarray,
        prompt_logprobs: np.ndarray | None = None,
        counts: np.ndarray | None = None,
        prompt_tops: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> list[Output]:
        """Applies a step's sampled tokens (one per row with `plan.sample` set, or
        `counts[i]` for the i-th such row when it verified proposals), and the prompt
        logprobs of the rows that asked for them (with `prompt_tops`, their ranks and
        top tokens too)."""
        outputs: list[Output] = []
        tokens = sampled.tolist()
        sample = step.plan.sampling.sample
        n_sampled = int(sample.sum())
        if counts is None:
            counts = np.ones(n_sampled, dtype=np.int32)
        if len(counts) != n_sampled or len(tokens) != int(counts.sum()):
            raise ValueError(
                f"step {step.plan.step_id}: {len(tokens)} tokens in {len(counts)} counts "
                f"for {n_sampled} sampled rows"
            )
        firsts = (np.cumsum(counts) - counts).tolist()
        counts = counts.tolist()
        proposed = step.plan.speculative
        proposed = proposed.tolist() if proposed is not None else [0] * len(step.reqs)
        k = 0
        scored_at = 0  # offset of the current row's entries in `prompt_logprobs`
        self.stats.steps += 1
        for req, n, do_sample, scored, spec in zip(
            step.reqs,
            step.num_new,
            sample.tolist(),
            step.plan.prompt_logprobs.counts.tolist(),
            proposed,
            strict=True,
        ):
            first, count = (firsts[k], counts[k]) if do_sample else (-1, 0)
            if do_sample:  # consumed even for a row that ended meanwhile: keeps k aligned
                k += 1
            values = None
            if scored:
                rows = slice(scored_at, scored_at + scored)
                values = prompt_logprobs[rows]
                if prompt_tops is not None and req.prompt_tops is not None:
                    self._keep_prompt_tops(req, [a[rows] for a in prompt_tops])
                scored_at += scored
            if req.status != Status.RUNNING:  # preempted is impossible mid-step; aborted is not
                continue
            try:
                outputs += self._apply(req, n, values, tokens, first, count, spec)
            except Exception as e:  # this request's bookkeeping broke: it alone fails
                outputs.append(self._fail(req, e))
        return outputs

    @staticmethod
    def _keep_prompt_tops(req: Request, tops: list[np.ndarray]) -> None:
        """This step's ranks and top tokens of `req`'s scored positions (the step's k is
        the most any row asked for: the request keeps its own first k)."""
        ranks, ids, lps = req.prompt_tops
        start = req.num_computed + 1
        stop = start + len(tops[0])
        k = ids.shape[1]
        ranks[start:stop] = tops[0]
        ids[start:stop], lps[start:stop] = tops[1][:, :k], tops[2][:, :k]

    def _apply(
        self,
        req: Request,
        n: int,
        values: np.ndarray | None,
        tokens: list[int],
        first: int,
        count: int,
        proposed: int,
    ) -> list[Output]:
        """One request's part of a step: `n` tokens computed (`proposed` of them
        proposals, of which `count - 1` were accepted), its prompt logprobs (`values`),
        and the `count` tokens sampled from `first` on in the step's arrays."""
        if values is not None:
            start = req.num_computed + 1
            req.prompt_logprobs[start : start + len(values)] = values
        req.num_inflight -= n
        # The KV of rejected proposals is not kept: their positions are computed again.
        req.num_computed += n - (proposed - max(count - 1, 0))
        if self._caching(req):
            self._cache_full_blocks(req)
        if first < 0:
            return []
        req.num_pending -= 1
        if proposed:
            req.spec_inflight = False
            self.stats.spec_proposed_tokens += proposed
            self.stats.spec_accepted_tokens += count - 1
        outs = []
        for row in range(first, first + count):
            token = tokens[row]
            req.append(token)
            reason = req.finish_reason(token, self.cfg.eos_token_ids)
            if req.matcher is not None:
                if not req.matcher.consume_token(token):
                    why = req.matcher.get_error().splitlines()[0]  # the rest is a state dump
                    raise RuntimeError(f"token {token} broke the grammar: {why}")
                if reason is None and req.matcher.is_stopped():  # complete: nothing may follow
                    reason = FinishReason.EOS
            out = Output(req, token, reason, row)
            if req.num_generated == 1:
                out.prompt_logprobs, out.prompt_tops = req.prompt_logprobs, req.prompt_tops
            outs.append(out)
            if reason is not None:  # what was accepted after it is never emitted
                self._finish(req, reason)
                return outs
        if proposed:  # blocks reserved for rejected proposals go back
            keep = self.pool.blocks_for(req.num_computed)
            self.pool.release(req.block_ids[keep:])
            del req.block_ids[keep:]
        return outs

    def _finish(self, req: Request, reason: FinishReason) -> Output:
        if req.status == Status.RUNNING:
            self.running.remove(req)
        elif req.status == Status.WAITING:
            self.waiting.remove(req)
        self._drop_blocks(req)
        req.status = Status.FINISHED
        self._released.append(req.seq_id)
        del self.requests[(req.frontend, req.req_id)]
        return Output(req, -1, reason)
