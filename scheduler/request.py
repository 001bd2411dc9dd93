"""The scheduler's view of one request: token ids and KV progress, no text."""

from __future__ import annotations

from enum import IntEnum

import numpy as np

from tgi_mp.ipc.messages import FinishReason, SamplingParams


class Status(IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class Request:
    """Tokens live in one preallocated int32 array (prompt, then generated).

    `num_computed` counts the tokens whose KV is in this request's blocks. A
    step computes `num_tokens - num_computed` tokens at most; when it catches
    up, the last position's logits give the next token. Preemption resets
    `num_computed` to 0 and keeps the tokens, so recompute is a longer prefill.

    With overlapped scheduling the next step is planned while one is in flight:
    `num_inflight` of its tokens are being computed and `num_pending` tokens
    are being sampled (their ids unknown until the step's result is applied;
    the sampled one is row `inflight_row` of that step's tokens). Planning reads
    the `planned_*` counts, which include them.
    """

    __slots__ = (
        "block_ids",
        "block_keys",
        "cache_root",
        "frontend",
        "inflight_row",
        "matcher",
        "num_cached",
        "num_computed",
        "num_inflight",
        "num_pending",
        "num_preemptions",
        "num_prompt",
        "num_proposed",
        "num_tokens",
        "params",
        "pending_matcher",
        "prompt_logprobs",
        "prompt_tops",
        "req_id",
        "seed",
        "seq_id",
        "spec_inflight",
        "started",
        "status",
        "tokens",
    )

    def __init__(
        self,
        req_id: int,
        frontend: bytes,
        prompt: np.ndarray,
        params: SamplingParams,
        seed: int,
        seq_id: int = 0,
    ) -> None:
        self.req_id = req_id
        self.seq_id = seq_id  # unique within the scheduler (req_id is only per frontend)
        self.frontend = frontend
        self.params = params
        self.seed = seed
        self.num_prompt = len(prompt)
        self.tokens = np.empty(self.num_prompt + params.max_new_tokens, dtype=np.int32)
        self.tokens[: self.num_prompt] = prompt
        self.num_tokens = self.num_prompt
        self.num_computed = 0
        self.num_inflight = 0
        self.num_pending = 0
        self.inflight_row = -1
        # Speculative decoding: proposals the plan being built appends to its input (held
        # in `tokens` past `num_tokens`), and whether a step verifying some is in flight.
        self.num_proposed = 0
        self.spec_inflight = False
        self.block_ids: list[int] = []
        # Prefix-cache keys of the leading full, computed blocks of `block_ids`.
        self.block_keys: list = []
        self.cache_root = None  # the BlockKey its prefix-cache chain starts from (LoRA)
        self.num_cached = 0  # tokens served from the prefix cache at the last admission
        self.started = False  # planned since its last admission (executors know it)
        self.status = Status.WAITING
        self.num_preemptions = 0
        # Filled as prompt chunks are computed when the request asked for them (position
        # i: logprob of prompt token i given the tokens before it; 0 stays NaN).
        self.prompt_logprobs: np.ndarray | None = None
        # Its grammar's matcher (scheduler.grammar), once built; until then the future.
        self.matcher = None
        self.pending_matcher = None
        # With prompt_top_k > -1: each position's rank, top ids and top logprobs.
        self.prompt_tops: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        if params.prefill_logprobs:
            self.prompt_logprobs = np.full(self.num_prompt, np.nan, dtype=np.float32)
            if params.prompt_top_k >= 0:
                k = params.prompt_top_k
                self.prompt_tops = (
                    np.zeros(self.num_prompt, dtype=np.int32),
                    np.full((self.num_prompt, k), -1, dtype=np.int32),
                    np.full((self.num_prompt, k), np.nan, dtype=np.float32),
                )

    @property
    def num_generated(self) -> int:
        return self.num_tokens - self.num_prompt

    @property
    def planned_computed(self) -> int:
        """Tokens whose KV is in the blocks once the step in flight is done."""
        return self.num_computed + self.num_inflight

    @property
    def planned_tokens(self) -> int:
        """Tokens once the step in flight's sampled token is appended (and the proposals
        of the plan being built)."""
        return self.num_tokens + self.num_pending + self.num_proposed

    def reset_inflight(self) -> None:
        """What is in flight for this request will be discarded (preempted, finished)."""
        self.num_inflight = self.num_pending = self.num_proposed = 0
        self.inflight_row = -1
        self.spec_inflight = False

    def prompt_logprobs_wanted(self, n: int) -> int:
        """How many of the next `n` positions score a prompt token: those whose next token
        is in the prompt, until the first token is generated (a recompute skips them)."""
        if self.prompt_logprobs is None or self.num_generated + self.num_pending:
            return 0
        return max(0, min(n, self.num_prompt - 1 - self.planned_computed))

    def append(self, token: int) -> None:
        self.tokens[self.num_tokens] = token
        self.num_tokens += 1

    def finish_reason(self, token: int, eos_ids: frozenset[int]) -> FinishReason | None:
        """Checked after `token` was appended."""
        p = self.params
        if self.num_generated >= p.max_new_tokens:  # first, as in TGI: an EOS here is `length`
            return FinishReason.LENGTH
        if not p.ignore_eos and token in eos_ids:
            return FinishReason.EOS
        if token in p.stop_token_ids:
            return FinishReason.STOP_SEQUENCE
        return None
