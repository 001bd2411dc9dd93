"""One request's tokens as TGI reports them: text pieces, stop strings, finish reason."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from tgi_mp.frontend import metrics, tracing
from tgi_mp.frontend.detokenizer import IncrementalDetokenizer, StopMatcher
from tgi_mp.frontend.engine_client import EngineClient
from tgi_mp.frontend.http import header
from tgi_mp.frontend.protocol import PrefillToken, Token
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
    aborts the request in the scheduler, which frees its KV blocks."""
    detok = IncrementalDetokenizer(tokenizer, v.prompt_ids)
    stops = StopMatcher(v.stop)
    start = time.perf_counter()
    async with contextlib.aclosing(client.generate(v.prompt_ids, v.params)) as outs:
        async for out in outs:
            if not gen.tokens:
                gen.queue_time = time.perf_counter() - start
            reason = out.finish_reason
            if out.cached_tokens is not None:
                gen.cached_tokens = out.cached_tokens
            if out.prompt_logprobs is not None:
                gen.prefill = prefill_tokens(tokenizer, v.prompt_ids, out.prompt_logprobs)
            if out.token_id >= 0:
                text = detok.add(out.token_id)
                if reason is None and stops.feed(text) is not None:
                    reason = FinishReason.STOP_SEQUENCE
                if reason is not None:  # so the token texts add up to generated_text
                    text += detok.flush()
                special = out.token_id in special_ids
                gen.tokens.append(Token(out.token_id, text, out.logprob, special))
                if v.params.top_n_tokens and out.top is not None:
                    gen.top_tokens.append(
                        [
                            Token(
                                i,
                                tokenizer.decode([i], skip_special_tokens=False),
                                lp,
                                i in special_ids,
                            )
                            for i, lp in out.top[: v.params.top_n_tokens]
                        ]
                    )
            if reason is not None:
                gen.finish_reason = FINISH_NAMES.get(reason, "length")
                gen.text = detok.generated_text()
            if out.token_id >= 0:
                yield gen.tokens[-1]
            if reason is not None:
                return


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


async def run_all(coros: list[Coroutine[object, object, None]]) -> None:
    """Runs requests side by side; the first error cancels (so aborts) the others and
    propagates as itself, and so does a cancellation from outside."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def report_success(
    scope: dict,
    t0: float,
    t_valid: float,
    queue_time: float,
    input_tokens: int,
    generated: int,
    max_new_tokens: int,
) -> None:
    """A finished request in the metrics, and in a trace when tracing is on."""
    end = time.perf_counter()
    metrics.success(end - t0, t_valid - t0, queue_time, input_tokens, generated, max_new_tokens)
    if tracing.enabled():
        tracing.record(
            scope["path"],
            header(scope, b"traceparent"),
            t0,
            t_valid,
            t_valid + queue_time,
            end,
            {"input_tokens": input_tokens, "generated_tokens": generated},
        )
