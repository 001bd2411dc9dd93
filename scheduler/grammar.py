"""Grammar matchers of constrained requests (llguidance), owned by the scheduler.

A request's grammar (compiled and checked by the frontend) becomes a matcher in a
worker thread, off the step loop: llguidance drops the GIL while it builds one, and
the request waits in the queue until it is ready, without holding anyone up. Each
step, the masks of the constrained rows are filled in parallel by llguidance's own
threads (no GIL), after the plan has gone out, so the forward runs meanwhile; each
sampled token is then consumed by its request's matcher.

Why llguidance (not xgrammar or outlines-core): no torch dependency (the scheduler
has none), masks filled in parallel without the GIL straight into a numpy array,
JSON schema, regex and Lark in one engine, and lazy compilation: a new schema costs
no up-front index over the vocabulary (perf/RESULTS.md measures it).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np

log = logging.getLogger("tgi_mp.scheduler")


class GrammarUnavailable(RuntimeError):
    pass


class Grammars:
    def __init__(self, tokenizer_json: str | None, vocab_size: int, eos_ids: Iterable[int]) -> None:
        self._tokenizer_json = tokenizer_json
        self._vocab_size = vocab_size
        self._eos = sorted(eos_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        threads = int(os.environ.get("TGI_MP_GRAMMAR_THREADS", "0")) or max(
            1, min(4, os.cpu_count() or 1)
        )
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self._executor = llguidance.LLExecutor(threads)
        self.words = (vocab_size + 31) // 32  # int32 words of one row's mask

    def compile(self, grammar: str) -> Future[llguidance.LLMatcher]:
        """A matcher for `grammar`, built in the worker thread (the first one also
        builds llguidance's view of the tokenizer, ~0.2 s)."""
        if self._tokenizer_json is None:
            raise GrammarUnavailable("grammars need the model's tokenizer, which it has none of")
        return self._pool.submit(self._matcher, grammar)

    def _matcher(self, grammar: str) -> llguidance.LLMatcher:
        t0 = time.perf_counter()
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"grammar is not valid: {matcher.get_error()}")
        log.debug("grammar matcher built in %.1f ms", (time.perf_counter() - t0) * 1e3)
        return matcher

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:  # only the worker thread gets here
            tokenizer = llguidance.LLTokenizer(
                self._tokenizer_json, n_vocab=self._vocab_size, eos_token=self._eos
            )
            self._tokenizer = tokenizer
        return self._tokenizer

    def masks(self, matchers: list[llguidance.LLMatcher]) -> np.ndarray:
        """The allowed next tokens of each matcher, one bitmask row each."""
        bitmask = np.zeros((len(matchers), self.words), dtype=np.int32)
        if not matchers:
            return bitmask
        llg_numpy.fill_next_token_bitmask_par(
            self._executor, [(m, i) for i, m in enumerate(matchers)], bitmask
        )
        # A matcher in an error state allows nothing; let it end on EOS (its request is
        # failed when the token comes back) rather than sample from an empty row.
        for row in np.flatnonzero(~bitmask.any(axis=1)):
            for eos in self._eos:
                bitmask[row, eos // 32] |= np.int32(np.uint32(1 << (eos % 32)).view(np.int32))
        return bitmask

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def read_tokenizer(tokenizer_dir: str | None) -> str | None:
    """The tokenizer.json text the frontend also reads, or None if the model has none."""
    if tokenizer_dir is None:
        return None
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()
