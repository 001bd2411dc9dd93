"""A scheduled step: the `StepPlan` (column groups) executors receive, and the
`Output` each request gets from it.

Everything an executor needs to run the step and sample from it travels as numpy
arrays (one entry per sequence, or per token for the ragged ones with their
counts), so the message is a few buffers whatever the batch size. Building a
plan changes nothing: the scheduler marks what it planned afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tgi_mp.ipc.messages import (
    BatchLayout,
    FinishReason,
    GrammarColumns,
    LogitBiasColumns,
    PenaltyColumns,
    PromptLogprobColumns,
    SamplingColumns,
    SamplingParams,
    StepPlan,
)
from tgi_mp.scheduler.request import Request


@dataclass
class ScheduledStep:
    plan: StepPlan
    reqs: list[Request]
    num_new: list[int]
    decode_only: bool = False  # no prompt work in it (the metrics' "decode" method)
    sent_at: float = 0.0  # when the scheduler sent it (perf_counter)


@dataclass
class Output:
    """One request's news from a step: a token (or -1) and maybe a finish reason."""

    req: Request
    token: int
    finish: FinishReason | None
    row: int = -1  # index of this token in the step's sampled arrays (its logprob's too)
    prompt_logprobs: np.ndarray | None = None  # with the first token, when asked for
    prompt_tops: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # likewise
    error: str | None = None  # the engine failed this request (finish is ERROR)


def build_step_plan(
    step_id: int,
    reqs: list[Request],
    num_new: list[int],
    released: np.ndarray,
    eos_ids: frozenset[int] = frozenset(),
) -> StepPlan:
    """The plan computing `num_new[i]` tokens of `reqs[i]`; `released` are the sequence
    ids that ended since the last plan (executors drop their per-sequence state);
    `eos_ids`: what `min_tokens` holds back."""
    n = len(reqs)
    query_lens = np.array(num_new, dtype=np.int32)
    context_lens = np.fromiter((r.planned_computed for r in reqs), np.int32, n)
    # A row whose last input is the token its step in flight samples: a placeholder
    # here, filled in by the executors from that step's tokens (`input_from`).
    input_from = np.fromiter((r.inflight_row if r.num_pending else -1 for r in reqs), np.int32, n)
    layout = BatchLayout(
        query_lens=query_lens,
        context_lens=context_lens,
        input_ids=np.concatenate(
            [
                _inputs(r, start, k)
                for r, start, k in zip(reqs, context_lens.tolist(), num_new, strict=True)
            ]
        ),
        block_counts=np.fromiter((len(r.block_ids) for r in reqs), np.int32, n),
        block_tables=np.fromiter(
            (b for r in reqs for b in r.block_ids), np.int32, sum(len(r.block_ids) for r in reqs)
        ),
        input_from=input_from if (input_from >= 0).any() else None,
    )
    planned = np.fromiter((r.planned_tokens for r in reqs), np.int32, n)
    sample = context_lens + query_lens == planned
    constrained = [i for i, r in enumerate(reqs) if sample[i] and r.matcher is not None]
    proposed = np.fromiter((r.num_proposed for r in reqs), np.int32, n)
    return StepPlan(
        step_id=step_id,
        layout=layout,
        sampling=_sampling(reqs, sample),
        penalties=_penalties(reqs, released),
        prompt_logprobs=_prompt_logprobs(reqs, num_new),
        bias=_bias(reqs, eos_ids),
        grammar=GrammarColumns(np.array(constrained, dtype=np.int32)),
        speculative=proposed if proposed.any() else None,
    )


def _inputs(req: Request, start: int, k: int) -> np.ndarray:
    """Tokens [start, start + k) of `req`; a token still being sampled reads as 0."""
    known = req.tokens[start : min(start + k, req.num_tokens + req.num_proposed)]
    if len(known) == k:
        return known
    return np.concatenate([known, np.zeros(k - len(known), np.int32)])


def _sampling(reqs: list[Request], sample: np.ndarray) -> SamplingColumns:
    params = [r.params for r in reqs]
    return SamplingColumns(
        sample=sample,
        temperature=np.array(
            [p.temperature if p.do_sample else 0.0 for p in params], dtype=np.float32
        ),
        top_k=np.array([p.top_k for p in params], dtype=np.int32),
        top_p=np.array([p.top_p for p in params], dtype=np.float32),
        typical_p=np.array([p.typical_p for p in params], dtype=np.float32),
        min_p=np.array([p.min_p for p in params], dtype=np.float32),
        seeds=np.array([r.seed for r in reqs], dtype=np.int64),
        sample_index=np.fromiter(
            (r.num_generated + r.num_pending for r in reqs), np.int32, len(reqs)
        ),
        top_n=np.array([p.top_n_tokens for p in params], dtype=np.int32),
        watermark=np.array([p.watermark for p in params], dtype=bool),
    )


def _penalties(reqs: list[Request], released: np.ndarray) -> PenaltyColumns:
    params = [r.params for r in reqs]
    # A sequence starting on a cached prefix: executors keeping its penalty history
    # get the tokens they did not compute.
    history_counts = np.zeros(len(reqs), dtype=np.int32)
    history: list[np.ndarray] = []
    for i, r in enumerate(reqs):
        if not r.started and r.num_computed and _penalised(r.params):
            history_counts[i] = r.num_computed
            history.append(r.tokens[: r.num_computed])
    return PenaltyColumns(
        seq_ids=np.fromiter((r.seq_id for r in reqs), np.int64, len(reqs)),
        prompt_lens=np.fromiter((r.num_prompt for r in reqs), np.int32, len(reqs)),
        repetition=np.array([p.repetition_penalty for p in params], np.float32),
        frequency=np.array([p.frequency_penalty for p in params], np.float32),
        presence=np.array([p.presence_penalty for p in params], np.float32),
        released=released,
        history_counts=history_counts,
        history_ids=np.concatenate(history) if history else np.empty(0, np.int32),
    )


def _prompt_logprobs(reqs: list[Request], num_new: list[int]) -> PromptLogprobColumns:
    scored = [r.prompt_logprobs_wanted(k) for r, k in zip(reqs, num_new, strict=True)]
    targets = [
        r.tokens[r.planned_computed + 1 : r.planned_computed + 1 + k]
        for r, k in zip(reqs, scored, strict=True)
        if k
    ]
    tops = any(k and r.params.prompt_top_k >= 0 for r, k in zip(reqs, scored, strict=True))
    return PromptLogprobColumns(
        counts=np.array(scored, dtype=np.int32),
        targets=np.concatenate(targets) if targets else np.empty(0, np.int32),
        # Sent only when a row scored now wants its prompt's ranks and top tokens.
        top_k=np.array([r.params.prompt_top_k for r in reqs], np.int32) if tops else None,
    )


def _bias(reqs: list[Request], eos_ids: frozenset[int]) -> LogitBiasColumns:
    """Each row's logit bias: the request's own, and -inf on the tokens that would end it
    while it has fewer than `min_tokens` (counting the one sampled now)."""
    rows = [_row_bias(r, eos_ids) for r in reqs]
    return LogitBiasColumns(
        counts=np.array([len(b) for b in rows], dtype=np.int32),
        ids=np.array([i for b in rows for i, _ in b], dtype=np.int32),
        values=np.array([v for b in rows for _, v in b], dtype=np.float32),
    )


def _row_bias(r: Request, eos_ids: frozenset[int]) -> tuple[tuple[int, float], ...]:
    p = r.params
    if p.min_tokens <= r.num_generated + r.num_pending:
        return p.logit_bias
    enders = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_ids))
    return (*p.logit_bias, *((i, -np.inf) for i in sorted(enders)))


def _penalised(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
