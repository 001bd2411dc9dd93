"""One choice of an OpenAI answer: its sequence, the text its client sees (stop
strings left out), its logprobs, and the tokens of several choices interleaved."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tgi_mp.frontend import metrics
from tgi_mp.frontend.detokenizer import StopTrimmer
from tgi_mp.frontend.engine_client import RequestError, ShuttingDownError
from tgi_mp.frontend.generation import Generation, report_success
from tgi_mp.frontend.http import HTTPError
from tgi_mp.frontend.openai_protocol import (
    CompletionLogprobs,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from tgi_mp.frontend.openai_requests import openai_error
from tgi_mp.frontend.protocol import Token
from tgi_mp.frontend.validation import ValidRequest

if TYPE_CHECKING:
    from tgi_mp.frontend.app import App

FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}

# ---------------------------------------------------------------- one choice


@dataclass
class Choice:
    """One sequence of an answer: its request, what it produced, what its client sees."""

    index: int
    v: ValidRequest
    special_ids: set[int]
    gen: Generation = field(default_factory=Generation)
    trimmer: StopTrimmer = field(init=False)
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    want_logprobs: bool = False
    prompt_len: int = 0
    valid_at: float = field(default_factory=time.perf_counter)  # made right after validation

    def __post_init__(self) -> None:
        self.trimmer = StopTrimmer(self.v.stop)
        self.prompt_len = len(self.v.prompt_ids)

    def add(self, tok: Token) -> str:
        """The new visible text for this token (special tokens show nothing)."""
        piece = "" if tok.special else tok.text
        visible = self.trimmer.push(piece)
        if self.gen.finish_reason:
            visible += self.trimmer.flush()
        self.text.append(visible)
        if self.v.params.top_n_tokens or self.want_logprobs:
            top = self.gen.top_tokens[-1] if self.gen.top_tokens else []
            self.logprobs.append(
                TokenLogprob(
                    tok.text,
                    finite(tok.logprob),
                    list(tok.text.encode()),
                    [TopLogprob(t.text, finite(t.logprob), list(t.text.encode())) for t in top],
                )
            )
        return visible

    @property
    def finish_reason(self) -> str:
        return FINISH.get(self.gen.finish_reason, "length")

    def mean_logprob(self) -> float:
        return self.gen.mean_logprob()


def finite(x: float | None) -> float:
    return -9999.0 if x is None or x != x else x


async def interleaved_tokens(
    app: App, choices: list[Choice]
) -> AsyncIterator[tuple[Choice, Token]]:
    """The tokens of every choice, interleaved as they come. An error in one cancels
    (so aborts) the others and propagates; so does leaving the loop early."""
    queue: asyncio.Queue[tuple[Choice, Token | BaseException | None]] = asyncio.Queue()

    async def feed(c: Choice) -> None:
        try:
            async for tok in app.tokens(c.v, c.gen):
                queue.put_nowait((c, tok))
            queue.put_nowait((c, None))
        except Exception as e:
            queue.put_nowait((c, e))

    tasks = [asyncio.ensure_future(feed(c)) for c in choices]
    try:
        left = len(tasks)
        while left:
            c, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield c, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def engine_error(e: Exception) -> HTTPError:
    if isinstance(e, RequestError):
        metrics.failure("validation")
        return openai_error(422, str(e))
    if isinstance(e, ShuttingDownError):
        metrics.failure("shutting_down")
        return openai_error(503, str(e), code="shutting_down")
    metrics.failure("generation")
    return openai_error(424, f"Request failed during generation: {e}")


def usage_of(choices: list[Choice], per_prompt: int) -> Usage:
    """Prompt tokens once per prompt (its choices share it), completion tokens of every
    sequence generated."""
    prompt = sum(c.prompt_len for c in choices[::per_prompt])
    cached = sum(c.gen.cached_tokens for c in choices[::per_prompt])
    completion = sum(len(c.gen.tokens) for c in choices)
    return Usage(prompt, completion, prompt + completion, PromptTokensDetails(cached))


def count_success(scope: dict, t0: float, choices: list[Choice]) -> None:
    first = choices[0]
    report_success(
        scope,
        t0,
        first.valid_at,
        min(c.gen.queue_time for c in choices),
        first.prompt_len,
        sum(len(c.gen.tokens) for c in choices),
        first.v.params.max_new_tokens,
    )


def completion_logprobs(c: Choice, echo: bool) -> CompletionLogprobs:
    """The legacy logprobs object of a completion choice (with `echo`, the prompt's first)."""
    tokens, lps, tops = [], [], []
    if echo:
        for t in c.gen.prefill:
            tokens.append(t.text)
            lps.append(t.logprob)
            tops.append(None)
    for entry in c.logprobs:
        tokens.append(entry.token)
        lps.append(entry.logprob)
        tops.append({t.token: t.logprob for t in entry.top_logprobs})
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return CompletionLogprobs(tokens, lps, tops, offsets)
