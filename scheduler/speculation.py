"""Speculative decoding's proposer: n-gram lookup in a request's own tokens.

Text that quotes its input (summaries, edits of code, extraction) repeats long
runs of the prompt: after the last few tokens, what followed them the last time
they occurred is a good guess at what follows now. The target model checks the
guesses in one forward (`executor/runner.py`), keeps the ones it agrees with
and adds its own next token, so output is exactly what it would be without
speculation; a wrong guess costs only its share of that forward.
"""

from __future__ import annotations

import numpy as np

from tgi_mp.ipc.messages import SamplingParams
from tgi_mp.scheduler.request import Request

_EMPTY = np.empty(0, dtype=np.int32)


def ngram_proposal(tokens: np.ndarray, k: int, n_max: int, n_min: int) -> np.ndarray:
    """Up to `k` tokens that followed the most recent earlier occurrence of the longest
    suffix of `tokens` (n_max down to n_min tokens long) that occurred before."""
    length = len(tokens)
    if k <= 0:
        return _EMPTY
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        # Every window of n tokens that ends before the last token: a match must have
        # something after it.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: length - 1], n)
        hits = np.flatnonzero((windows == tokens[length - n :]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start : start + k]
    return _EMPTY


def can_speculate(req: Request) -> bool:
    """Requests whose next token's distribution does not depend on the tokens sampled
    before it in the same step: no penalties over the history, no grammar state, no
    watermark (its green list is seeded by the previous token), no `min_tokens` still
    holding EOS back (its bias would hold for every proposal)."""
    p: SamplingParams = req.params
    return (
        req.matcher is None
        and p.min_tokens <= req.num_generated + req.num_pending  # its bias ends mid-step
        and p.grammar is None
        and not p.watermark
        and p.repetition_penalty == 1.0
        and p.frequency_penalty == 0.0
        and p.presence_penalty == 0.0
    )
