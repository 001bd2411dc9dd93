"""A scheduled step as the executors receive it: one `StepPlan` of flat columns.

Everything an executor needs to run the step and sample from it travels as numpy
arrays (one entry per sequence, or per token for the ragged ones with their
counts), so the message is a few buffers whatever the batch size.
"""

from __future__ import annotations

import numpy as np

from tgi_mp.ipc.messages import SamplingParams, StepPlan
from tgi_mp.scheduler.request import Request


def build_step_plan(
    step_id: int, reqs: list[Request], num_new: list[int], released: np.ndarray
) -> StepPlan:
    """The plan computing `num_new[i]` tokens of `reqs[i]`; `released` are the sequence
    ids that ended since the last plan (executors drop their per-sequence state).
    Marks each request as started: its first plan carries its cached-prefix history."""
    query_lens = np.array(num_new, dtype=np.int32)
    context_lens = np.fromiter((r.num_computed for r in reqs), np.int32, len(reqs))
    sample = context_lens + query_lens == np.fromiter(
        (r.num_tokens for r in reqs), np.int32, len(reqs)
    )
    input_ids = np.concatenate(
        [r.tokens[r.num_computed : r.num_computed + n] for r, n in zip(reqs, num_new, strict=True)]
    )
    params = [r.params for r in reqs]
    scored = [r.prompt_logprobs_wanted(n) for r, n in zip(reqs, num_new, strict=True)]
    targets = [
        r.tokens[r.num_computed + 1 : r.num_computed + 1 + k]
        for r, k in zip(reqs, scored, strict=True)
        if k
    ]
    # A sequence starting on a cached prefix: executors keeping its penalty history
    # get the tokens they did not compute.
    history_counts = np.zeros(len(reqs), dtype=np.int32)
    history: list[np.ndarray] = []
    for i, r in enumerate(reqs):
        if not r.started:
            r.started = True
            if r.num_computed and _penalised(r.params):
                history_counts[i] = r.num_computed
                history.append(r.tokens[: r.num_computed])
    return StepPlan(
        step_id=step_id,
        query_lens=query_lens,
        context_lens=context_lens,
        input_ids=input_ids,
        block_counts=np.fromiter((len(r.block_ids) for r in reqs), np.int32, len(reqs)),
        block_tables=np.fromiter(
            (b for r in reqs for b in r.block_ids),
            np.int32,
            sum(len(r.block_ids) for r in reqs),
        ),
        sample=sample,
        temperature=np.array(
            [p.temperature if p.do_sample else 0.0 for p in params], dtype=np.float32
        ),
        top_k=np.array([p.top_k for p in params], dtype=np.int32),
        top_p=np.array([p.top_p for p in params], dtype=np.float32),
        seeds=np.array([r.seed for r in reqs], dtype=np.int64),
        sample_index=np.fromiter((r.num_generated for r in reqs), np.int32, len(reqs)),
        typical_p=np.array([p.typical_p for p in params], dtype=np.float32),
        min_p=np.array([p.min_p for p in params], dtype=np.float32),
        top_n=np.array([p.top_n_tokens for p in params], dtype=np.int32),
        seq_ids=np.fromiter((r.seq_id for r in reqs), np.int64, len(reqs)),
        prompt_lens=np.fromiter((r.num_prompt for r in reqs), np.int32, len(reqs)),
        repetition_penalty=np.array([p.repetition_penalty for p in params], np.float32),
        frequency_penalty=np.array([p.frequency_penalty for p in params], np.float32),
        presence_penalty=np.array([p.presence_penalty for p in params], np.float32),
        released=released,
        watermark=np.array([p.watermark for p in params], dtype=bool),
        prompt_logprobs=np.array(scored, dtype=np.int32),
        prompt_targets=np.concatenate(targets) if targets else np.empty(0, np.int32),
        bias_counts=np.array([len(p.logit_bias) for p in params], dtype=np.int32),
        bias_ids=np.array([i for p in params for i, _ in p.logit_bias], dtype=np.int32),
        bias_values=np.array([b for p in params for _, b in p.logit_bias], dtype=np.float32),
        history_counts=history_counts,
        history_ids=np.concatenate(history) if history else np.empty(0, np.int32),
    )


def _penalised(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
