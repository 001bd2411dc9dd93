"""TGI's own API: `/generate`, `/generate_stream`, `POST /`, `/tokenize`, `/info`,
`/health`, `/metrics`, with TGI's wire types (`tgi_protocol`) and its rules."""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import msgspec

from tgi_mp.frontend import errors, metrics
from tgi_mp.frontend.generation import Generation, check_complete, count_success, fan_out
from tgi_mp.frontend.http import (
    Headers,
    Receive,
    Scope,
    Send,
    decode_json,
    respond,
    respond_json,
    stream_sse,
    until_disconnect,
)
from tgi_mp.frontend.openai_protocol import ChatCompletionRequest
from tgi_mp.frontend.tgi_protocol import (
    BestOfSequence,
    ChatTokenizeResponse,
    Details,
    GenerateRequest,
    GenerateResponse,
    Info,
    StreamDetails,
    StreamResponse,
    TokenizeItem,
)
from tgi_mp.frontend.validation import ValidRequest, validate, with_fresh_seed

if TYPE_CHECKING:
    from tgi_mp.frontend.app import App


class TgiRoutes:
    def __init__(self, app: App) -> None:
        self.app = app

    # ------------------------------------------------------------ generation

    async def handle_post(
        self, scope: Scope, path: str, body: bytes, receive: Receive, send: Send, cors: Headers
    ) -> None:
        if path == "/":  # TGI's compat route also takes a one-element array
            with contextlib.suppress(msgspec.DecodeError, RecursionError):
                items = msgspec.json.decode(body, type=list[msgspec.Raw])
                if len(items) == 1:
                    body = bytes(items[0])
        if path == "/chat_tokenize":
            await self._chat_tokenize(scope, body, send, cors)
            return
        req = decode_json(scope, body, GenerateRequest)
        if path == "/tokenize":
            await self._tokenize(req, send, cors)
        elif path == "/generate_stream" or (path == "/" and req.stream):
            headers = [*cors, *_stream_headers(req)]
            await stream_sse(receive, send, headers, "tgi", self._events(scope, req))
        else:
            await self._generate(scope, req, receive, send, cors, wrap=path == "/")

    async def _admit(self, req: GenerateRequest) -> ValidRequest:
        """Concurrency permit first, then validation (off the event loop), as in TGI."""
        v = await self.app.validated(validate, req, self.app.cfg, self.app.tokenizer)
        self.app.permit(v.best_of)
        return v

    async def _generate(
        self,
        scope: Scope,
        req: GenerateRequest,
        receive: Receive,
        send: Send,
        cors: Headers,
        wrap: bool,
    ) -> None:
        t0 = time.perf_counter()
        v = await self._admit(req)
        t_valid = time.perf_counter()
        # best_of > 1: that many sampled sequences (own seeds, own permits), best mean logprob wins.
        runs = [
            (one, Generation()) for one in [v, *(with_fresh_seed(v) for _ in range(v.best_of - 1))]
        ]

        async def consume() -> None:
            async for _ in fan_out(self.app.tokens, runs):
                pass

        if not await until_disconnect(receive, consume()):
            return  # the client left: its requests were aborted
        check_complete(runs, stream=False)
        best, resp = generate_response(req, runs)
        headers = [*cors, *timing_headers(req, *runs[best], t0, t_valid)]
        count_success(scope, t0, t_valid, [runs[best]])
        await respond_json(send, [resp] if wrap else resp, headers)

    async def _events(self, scope: Scope, req: GenerateRequest) -> AsyncIterator[StreamResponse]:
        t0 = time.perf_counter()
        p = req.parameters
        if p is not None and p.best_of not in (None, 1):
            raise errors.invalid("`best_of` != 1 is not supported when streaming tokens", "best_of")
        if p is not None and p.decoder_input_details:
            raise errors.invalid(
                "`decoder_input_details` == true is not supported when streaming tokens",
                "decoder_input_details",
            )
        v = await self._admit(req)
        t_valid = time.perf_counter()
        gen = Generation()
        async for tok in self.app.tokens(v, gen):
            final = gen.finish_reason != ""
            details = None
            if final and v.details:
                details = StreamDetails(
                    gen.finish_reason, len(gen.tokens), v.seed, len(v.prompt_ids)
                )
            yield StreamResponse(
                index=len(gen.tokens),
                token=tok,
                top_tokens=gen.top_tokens[-1] if gen.top_tokens else [],
                generated_text=full_text(req, v, gen.text) if final else None,
                details=details,
            )
        check_complete([(v, gen)], stream=True)
        count_success(scope, t0, t_valid, [(v, gen)])

    # ------------------------------------------------------------ the other routes

    async def _tokenize(self, req: GenerateRequest, send: Send, cors: Headers) -> None:
        await respond_json(send, await self.app.off_loop(self._items, req.inputs, True), cors)

    async def _chat_tokenize(self, scope: Scope, body: bytes, send: Send, cors: Headers) -> None:
        """TGI's `/chat_tokenize`: a chat request's templated prompt and its tokens."""
        req = decode_json(scope, body, ChatCompletionRequest)
        templated = await self.app.off_loop(self.app.openai.chat_text, req)
        out = ChatTokenizeResponse(
            await self.app.off_loop(self._items, templated, False), templated
        )
        await respond_json(send, out, cors)

    def _items(self, text: str, add_special_tokens: bool) -> list[TokenizeItem]:
        # encode_batch lets go of the GIL (encode does not): other streams run meanwhile.
        (enc,) = self.app.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)
        raw = text.encode()
        # Offsets come in characters; TGI reports bytes: one table, built in one pass.
        byte_at = [0, *itertools.accumulate(len(c.encode()) for c in text)]
        items = []
        for tok_id, (start, stop) in zip(enc.ids, enc.offsets, strict=True):
            b0, b1 = byte_at[start], byte_at[stop]
            items.append(TokenizeItem(tok_id, raw[b0:b1].decode(errors="replace"), b0, b1))
        return items

    async def health(self, send: Send, cors: Headers) -> None:
        client = self.app.client
        if client is None or client.dead:
            error = errors.ApiError(503, "unhealthy", "healthcheck")
            await respond(send, 503, error.render("tgi"), headers=cors)
        else:
            await respond(send, 200, b"", None, cors)

    async def info(self, send: Send, cors: Headers) -> None:
        c = self.app.cfg
        info = Info(
            model_id=c.model_id,
            model_sha=None,
            model_pipeline_tag=None,
            max_concurrent_requests=c.max_concurrent_requests,
            max_best_of=c.max_best_of,
            max_stop_sequences=c.max_stop_sequences,
            max_input_tokens=c.max_input_tokens,
            max_total_tokens=c.max_total_tokens,
            validation_workers=c.validation_workers,
            max_client_batch_size=c.max_client_batch_size,
            router="tgi-mp",
            version=c.version,
            sha=None,
            docker_label=None,
            max_batch_total_tokens=c.max_batch_total_tokens,
            dtype=c.dtype,
            attention_backend=c.attention_backend,
        )
        await respond_json(send, info, cors)

    async def metrics(self, send: Send, cors: Headers) -> None:
        stats = await self.app.engine_stats()
        text = metrics.render(stats, self.app.in_flight, self.app.cfg.block_size)
        await respond(send, 200, text, metrics.CONTENT_TYPE, cors)


# ---------------------------------------------------------------- answers


def compute_type() -> bytes:
    """TGI's `x-compute-type` header: what the deployment says it runs on."""
    return os.environ.get("COMPUTE_TYPE", "cpu").encode()


def _stream_headers(req: GenerateRequest) -> Headers:
    return [
        (b"x-compute-type", compute_type()),
        (b"x-compute-characters", str(len(req.inputs)).encode()),
    ]


def full_text(req: GenerateRequest, v: ValidRequest, text: str) -> str:
    return req.inputs + text if v.return_full_text else text


def generate_response(
    req: GenerateRequest, runs: list[tuple[ValidRequest, Generation]]
) -> tuple[int, GenerateResponse]:
    """The index of the run with the best mean logprob and the answer built from it;
    with details, the other runs are its `best_of_sequences`."""
    best = max(range(len(runs)), key=lambda i: runs[i][1].mean_logprob())
    v, gen = runs[best]
    details = None
    if v.details:
        others = [
            BestOfSequence(
                full_text(req, r, g.text),
                g.finish_reason,
                len(g.tokens),
                r.seed,
                g.prefill,
                g.tokens,
                g.top_tokens,
            )
            for i, (r, g) in enumerate(runs)
            if i != best
        ]
        details = Details(
            gen.finish_reason,
            len(gen.tokens),
            v.seed,
            gen.prefill,
            gen.tokens,
            others,
            gen.top_tokens,
        )
    return best, GenerateResponse(full_text(req, v, gen.text), details)


def timing_headers(
    req: GenerateRequest, v: ValidRequest, gen: Generation, t0: float, t_valid: float
) -> Headers:
    """TGI's `x-*` headers of a finished request that arrived at `t0` and was
    validated at `t_valid` (perf_counter seconds)."""
    total = time.perf_counter() - t0
    inference = total - (t_valid - t0) - gen.queue_time
    n = max(len(gen.tokens), 1)

    def ms(seconds: float) -> bytes:
        return str(int(seconds * 1000)).encode()

    return [
        (b"x-compute-type", compute_type()),
        (b"x-compute-time", f"{total:.6f}".encode()),
        (b"x-compute-characters", str(len(req.inputs)).encode()),
        (b"x-total-time", ms(total)),
        (b"x-validation-time", ms(t_valid - t0)),
        (b"x-queue-time", ms(gen.queue_time)),
        (b"x-inference-time", ms(inference)),
        (b"x-time-per-token", ms(inference / n)),
        (b"x-prompt-tokens", str(len(v.prompt_ids)).encode()),
        (b"x-generated-tokens", str(len(gen.tokens)).encode()),
    ]
