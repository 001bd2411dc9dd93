"""One request's tokens as TGI reports them: text pieces, stop strings, finish reason."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from tgi_mp.frontend.detokenizer import IncrementalDetokenizer, StopMatcher
from tgi_mp.frontend.engine_client import EngineClient
from tgi_mp.frontend.protocol import Token
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
    finish_reason: str = ""  # set with the last token
    text: str = ""  # generated_text, set with the last token
    queue_time: float = 0.0  # until the first token


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
