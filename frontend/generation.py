"""One request's tokens as both APIs report them (text pieces, stop strings, finish
reason), several sequences of one request side by side, and a success in the metrics."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from tgi_mp.frontend import access, errors, metrics, tracing
from tgi_mp.frontend.detokenizer import IncrementalDetokenizer, StopMatcher
from tgi_mp.frontend.engine_client import EngineClient, EngineError, RequestError, TokenOutput
from tgi_mp.frontend.http import header
from tgi_mp.frontend.tgi_protocol import PrefillToken, Token
from tgi_mp.frontend.validation import ValidRequest
from tgi_mp.ipc.messages import FinishReason

FINISH_NAMES = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS: "eos_token",
    FinishReason.STOP_SEQUENCE: "stop_sequence",
}


@dataclass
class Generation:
    """What one request produced, filled in as its tokens arrive."""

    tokens: list[Token] = field(default_factory=list)
    top_tokens: list[list[Token]] = field(default_factory=list)  # per token, with top_n_tokens
    prefill: list[PrefillToken] = field(default_factory=list)  # with prefill logprobs
    # With prompt_top_k >= 0: per prompt position, its token's rank and the most likely
    # (id, logprob) pairs there.
    prompt_tops: tuple[list[int], list[list[tuple[int, float]]]] | None = None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    finish_reason: str = ""  # set with the last token
    text: str = ""  # generated_text, set with the last token
    queue_time: float = 0.0  # until the first token

    def mean_logprob(self) -> float:
        """What ranks `best_of` sequences (NaN logprobs, if any, count as -inf)."""
        lps = [t.logprob if t.logprob == t.logprob else float("-inf") for t in self.tokens]
        return sum(lps) / len(lps) if lps else float("-inf")


async def run(
    client: EngineClient,
    tokenizer: Tokenizer,
    special_ids: set[int],
    v: ValidRequest,
    gen: Generation,
) -> AsyncIterator[Token]:
    """Yields each token as it comes; leaving early (a stop string, a client gone)
    aborts the request in the scheduler, which frees its KV blocks. The engine's
    refusals and failures come out as the `ApiError`s clients are answered."""
    reader = _TokenReader(tokenizer, special_ids, v, gen)
    start = last = time.perf_counter()
    try:
        async with contextlib.aclosing(client.generate(v.prompt_ids, v.params)) as outs:
            async for out in outs:
                now = time.perf_counter()
                if not gen.tokens:
                    gen.queue_time = now - start
                else:
                    metrics.token_gap(now - last)
                last = now
                token, done = reader.take(out)
                if token is not None:
                    yield token
                if done:
                    return
    except (EngineError, RequestError) as e:
        raise errors.from_engine(e) from e


class _TokenReader:
    """Turns the engine's outputs for one request into TGI tokens, into `gen`."""

    def __init__(
        self, tokenizer: Tokenizer, special_ids: set[int], v: ValidRequest, gen: Generation
    ) -> None:
        self.tokenizer, self.special_ids, self.v, self.gen = tokenizer, special_ids, v, gen
        self.detok = IncrementalDetokenizer(tokenizer, v.prompt_ids)
        self.stops = StopMatcher(v.stop)

    def take(self, out: TokenOutput) -> tuple[Token | None, bool]:
        """The new token (None when the request ended without one) and whether it was
        the last."""
        gen, reason, token = self.gen, out.finish_reason, None
        if out.cached_tokens is not None:
            gen.cached_tokens = out.cached_tokens
        if out.prompt_logprobs is not None:
            gen.prefill = prefill_tokens(self.tokenizer, self.v.prompt_ids, out.prompt_logprobs)
            gen.prompt_tops = out.prompt_tops
        if out.token_id >= 0:
            text = self.detok.add(out.token_id)
            if reason is None and self.stops.feed(text) is not None:
                reason = FinishReason.STOP_SEQUENCE
            if reason is not None:  # so the token texts add up to generated_text
                text += self.detok.flush()
            token = Token(out.token_id, text, out.logprob, out.token_id in self.special_ids)
            gen.tokens.append(token)
            top_n = self.v.params.top_n_tokens
            if top_n and out.top is not None:
                gen.top_tokens.append([self._token(i, lp) for i, lp in out.top[:top_n]])
        if reason is not None:
            gen.finish_reason = FINISH_NAMES.get(reason, "length")
            gen.text = self.detok.generated_text()
        return token, reason is not None

    def _token(self, token_id: int, logprob: float) -> Token:
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return Token(token_id, text, logprob, token_id in self.special_ids)


def prefill_tokens(
    tokenizer: Tokenizer, ids: list[int], logprobs: list[float]
) -> list[PrefillToken]:
    """TGI's `details.prefill`: each prompt token decoded alone, with its logprob (the
    first has none: null)."""
    texts = tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False)
    return [
        PrefillToken(i, text, None if k == 0 or lp != lp else lp)
        for k, (i, text, lp) in enumerate(zip(ids, texts, logprobs, strict=True))
    ]


Sequence = tuple[ValidRequest, Generation]
TokenSource = Callable[[ValidRequest, Generation], AsyncIterator[Token]]


async def fan_out(tokens: TokenSource, runs: list[Sequence]) -> AsyncIterator[tuple[int, Token]]:
    """The tokens of several sequences of one request (best_of, n, several prompts),
    interleaved as they come: (index of the sequence, token). An error in one cancels
    (so aborts) the others and propagates; so does leaving the loop early."""
    if len(runs) == 1:  # the common case: no tasks, no queue
        async with contextlib.aclosing(tokens(*runs[0])) as it:
            async for tok in it:
                yield 0, tok
        return
    queue: asyncio.Queue[tuple[int, Token | BaseException | None]] = asyncio.Queue()

    async def feed(i: int, v: ValidRequest, gen: Generation) -> None:
        try:
            async for tok in tokens(v, gen):
                queue.put_nowait((i, tok))
            queue.put_nowait((i, None))
        except Exception as e:
            queue.put_nowait((i, e))

    tasks = [asyncio.ensure_future(feed(i, v, g)) for i, (v, g) in enumerate(runs)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def check_complete(runs: list[Sequence], stream: bool) -> None:
    """Every sequence ended with a final token (else the engine cut it short)."""
    if not all(gen.finish_reason for _, gen in runs):
        raise errors.incomplete(stream)


def count_success(scope: dict, t0: float, t_valid: float, runs: list[Sequence]) -> None:
    """A request answered in full, in the metrics (and a trace when tracing is on): its
    prompt once, the tokens of all its sequences."""
    end = time.perf_counter()
    first = runs[0][0]
    queue_time = min(g.queue_time for _, g in runs)
    input_tokens, generated = len(first.prompt_ids), sum(len(g.tokens) for _, g in runs)
    access.count_tokens(input_tokens, generated)
    metrics.success(
        end - t0,
        t_valid - t0,
        queue_time,
        input_tokens,
        generated,
        first.params.max_new_tokens,
        first.params.adapter,
    )
    if tracing.enabled():
        tracing.record(
            scope["path"],
            header(scope, b"traceparent"),
            t0,
            t_valid,
            t_valid + queue_time,
            end,
            {
                "input_tokens": input_tokens,
                "generated_tokens": generated,
                "request_id": entry.request_id if (entry := access.current()) else "",
            },
        )
