"""What the scheduler admits: a request whose every column fits the step plan's types.

The frontend validates requests with each API's rules; this is the engine's own
line of defence behind it. A request that passes here can be planned (int32 /
int64 / float32 columns) and sampled (finite parameters, ids in the vocabulary)
without an exception, so no request can take the engine down.
"""

from __future__ import annotations

import math

import numpy as np

from tgi_mp.ipc.messages import SamplingParams

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)


class RequestRejected(ValueError):
    """A request the scheduler will not admit (its frontend answers a 422)."""


def _finite32(x: float) -> bool:
    return math.isfinite(x) and abs(x) <= FLOAT32_MAX


def request_problem(
    prompt: np.ndarray, p: SamplingParams, vocab: int | None, capacity: int
) -> str | None:
    """Why this request cannot be admitted, or None."""
    if prompt.ndim != 1 or prompt.dtype != np.int32:
        return f"the prompt must be a 1-d int32 array (got {prompt.dtype}, {prompt.ndim}-d)"
    if len(prompt) == 0:
        return "the prompt is empty"
    if vocab is not None and (prompt.min() < 0 or prompt.max() >= vocab):
        return f"the prompt has token ids outside the vocabulary (0..{vocab - 1})"
    if not 1 <= p.max_new_tokens <= INT32_MAX:
        return "max_new_tokens must be at least 1"
    total = len(prompt) + p.max_new_tokens
    if total > capacity:
        return (
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({p.max_new_tokens}) = "
            f"{total} exceeds the KV cache capacity of {capacity} tokens"
        )
    return _sampling_problem(p, vocab)


def _sampling_problem(p: SamplingParams, vocab: int | None) -> str | None:
    floats = {
        "temperature": p.temperature,
        "top_p": p.top_p,
        "typical_p": p.typical_p,
        "min_p": p.min_p,
        "repetition_penalty": p.repetition_penalty,
        "frequency_penalty": p.frequency_penalty,
        "presence_penalty": p.presence_penalty,
    }
    for name, value in floats.items():
        if not _finite32(value):
            return f"{name} must be a finite 32-bit float (got {value})"
    if p.temperature < 0 or p.repetition_penalty <= 0:
        return "temperature must be >= 0 and repetition_penalty > 0"
    if not (0 < p.top_p <= 1 and 0 < p.typical_p <= 1 and 0 <= p.min_p <= 1):
        return "top_p and typical_p must be in (0, 1], min_p in [0, 1]"
    if not 0 <= p.top_k <= INT32_MAX:
        return f"top_k must be in 0..{INT32_MAX} (got {p.top_k})"
    top_n_max = vocab if vocab is not None else INT32_MAX
    if not 0 <= p.top_n_tokens <= top_n_max:
        return f"top_n_tokens must be in 0..{top_n_max} (got {p.top_n_tokens})"
    if p.seed is not None and not INT64_MIN <= p.seed <= INT64_MAX:
        return f"seed must fit 64 bits (got {p.seed})"
    ids = [i for i, _ in p.logit_bias] + list(p.stop_token_ids)
    hi = vocab - 1 if vocab is not None else INT32_MAX
    if any(not 0 <= i <= hi for i in ids):
        return f"logit_bias and stop_token_ids name token ids outside the vocabulary (0..{hi})"
    if any(not _finite32(b) for _, b in p.logit_bias):
        return "logit_bias values must be finite 32-bit floats"
    return None
