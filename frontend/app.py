"""The TGI-native HTTP API as an ASGI app (served by granian, one per worker).

Each worker owns a tokenizer and an `EngineClient`; it validates, tokenizes,
detokenizes and matches stop strings, and only token ids cross to the
scheduler. A client that goes away mid-stream cancels its handler, which
aborts the request in the scheduler and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator

import msgspec
from tokenizers import Tokenizer

from tgi_mp.frontend import metrics, tracing
from tgi_mp.frontend.engine_client import (
    EngineClient,
    EngineError,
    RequestError,
    ShuttingDownError,
)
from tgi_mp.frontend.generation import Generation, run, run_all
from tgi_mp.frontend.http import (
    SSE_HEADERS,
    HTTPError,
    Receive,
    Scope,
    Send,
    decode_json,
    header,
    method_not_allowed,
    not_found,
    read_body,
    respond,
    sse_event,
    unauthorized,
    until_disconnect,
)
from tgi_mp.frontend.openai_api import OpenAIRoutes
from tgi_mp.frontend.openapi import DOCS_HTML, openapi_document
from tgi_mp.frontend.protocol import (
    FrontendConfig,
    GenerateRequest,
    Info,
    StreamDetails,
    StreamResponse,
    Token,
    TokenizeItem,
)
from tgi_mp.frontend.tgi_response import (
    compute_type,
    count_success,
    full_text,
    generate_response,
    timing_headers,
)
from tgi_mp.frontend.validation import ValidationError, ValidRequest, validate, with_fresh_seed
from tgi_mp.process import bind_to_parent

CONFIG_ENV = "TGI_MP_FRONTEND_CONFIG"
log = logging.getLogger("tgi_mp.frontend")

_json = msgspec.json.Encoder()
_AUTH_PATHS = {"/", "/generate", "/generate_stream", "/tokenize"}


class App:
    def __init__(self, cfg: FrontendConfig | None = None) -> None:
        self._cfg = cfg
        self._client: EngineClient | None = None
        self.in_flight = 0

    @property
    def cfg(self) -> FrontendConfig:
        if self._cfg is None:
            with open(os.environ[CONFIG_ENV], "rb") as f:
                self._cfg = msgspec.msgpack.decode(f.read(), type=FrontendConfig)
        return self._cfg

    def _start(self) -> None:
        if self._client is None:
            cfg = self.cfg
            self.tokenizer = Tokenizer.from_file(os.path.join(cfg.tokenizer_dir, "tokenizer.json"))
            self.special_ids = set(self.tokenizer.get_added_tokens_decoder())
            metrics.configure(
                os.path.join(cfg.ipc_root, "metrics"), cfg.max_input_tokens, cfg.max_total_tokens
            )
            # A proxy, not a cycle: an App collected by refcount closes its ZeroMQ context
            # in order, while a cycle's collector may term the context before its sockets
            # are closed (and block forever).
            self.openai = OpenAIRoutes(weakref.proxy(self))
            if cfg.otlp_endpoint:
                tracing.setup(cfg.otlp_endpoint, cfg.otlp_service_name)
            self._client = EngineClient(cfg.ipc_root)

    # ------------------------------------------------------------ ASGI entry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        self._start()
        cors = self._cors_headers(scope)
        try:
            await self._route(scope, receive, send, cors)
        except HTTPError as e:
            await respond(send, e.status, e.body, e.content_type, cors)
        except Exception as e:  # a bug: answer it, log it, keep serving everyone else
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            err = HTTPError.json(500, f"Internal error: {type(e).__name__}", "internal")
            with contextlib.suppress(Exception):  # unless the response had already started
                await respond(send, 500, err.body, err.content_type, cors)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                # A granian worker dies with granian, which dies with tgi-mp serve.
                bind_to_parent(os.getppid())
                self._start()
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                if self._client is not None:
                    self._client.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _cors_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        allowed = self.cfg.cors_allow_origin
        origin = header(scope, b"origin")
        if not allowed:
            value = "*"
        elif origin in allowed:
            value = origin
        else:
            return []
        return [(b"access-control-allow-origin", value.encode()), (b"vary", b"origin")]

    async def _route(self, scope: Scope, receive: Receive, send: Send, cors: list) -> None:
        method, path = scope["method"], scope["path"]
        if method == "OPTIONS":  # CORS preflight
            extra = [
                (b"access-control-allow-methods", b"GET, POST"),
                (b"access-control-allow-headers", b"content-type, authorization"),
            ]
            await respond(send, 200, b"", None, cors + extra)
            return
        if path.startswith("/v1/"):
            await self.openai.handle(scope, receive, send, cors)
            return
        if method == "POST" and path in _AUTH_PATHS and not self.authorized(scope):
            raise unauthorized()
        if method == "GET":
            if path in ("/health", "/ping", "/"):
                await self._health(send, cors)
            elif path == "/info":
                await respond(send, 200, _json.encode(await self._info()), headers=cors)
            elif path == "/metrics":
                await respond(send, 200, await self._metrics(), metrics.CONTENT_TYPE, cors)
            elif path == "/api-doc/openapi.json":
                await respond(send, 200, openapi_document(self.cfg.version), headers=cors)
            elif path == "/docs":
                await respond(send, 200, DOCS_HTML, b"text/html; charset=utf-8", cors)
            else:
                raise not_found(method, path)
            return
        if path not in ("/generate", "/generate_stream", "/", "/tokenize"):
            raise not_found(method, path)
        if method != "POST":
            raise method_not_allowed(method, path)
        body = await read_body(scope, receive, self.cfg.payload_limit)
        if path == "/":  # TGI's compat route also takes a one-element array
            with contextlib.suppress(msgspec.DecodeError, RecursionError):
                items = msgspec.json.decode(body, type=list[msgspec.Raw])
                if len(items) == 1:
                    body = bytes(items[0])
        req = decode_json(scope, body, GenerateRequest)
        if path == "/tokenize":
            await self._tokenize(req, send, cors)
        elif path == "/generate_stream" or (path == "/" and req.stream):
            await self._generate_stream(scope, req, receive, send, cors)
        else:
            await self._generate(scope, req, receive, send, cors, wrap=path == "/")

    def authorized(self, scope: Scope) -> bool:
        key = self.cfg.api_key
        if not key:
            return True
        given = header(scope, b"authorization") or ""
        return given.lower() == f"bearer {key}".lower()

    # ------------------------------------------------------------ simple routes

    async def _health(self, send: Send, cors: list) -> None:
        if self._client is None or self._client.dead:
            body = _json.encode({"error": "unhealthy", "error_type": "healthcheck"})
            await respond(send, 503, body, headers=cors)
        else:
            await respond(send, 200, b"", None, cors)

    async def _info(self) -> Info:
        c = self.cfg
        return Info(
            model_id=c.model_id,
            model_sha=None,
            model_pipeline_tag=None,
            max_concurrent_requests=c.max_concurrent_requests,
            max_best_of=c.max_best_of,
            max_stop_sequences=c.max_stop_sequences,
            max_input_tokens=c.max_input_tokens,
            max_total_tokens=c.max_total_tokens,
            validation_workers=1,
            max_client_batch_size=c.max_client_batch_size,
            router="tgi-mp",
            version=c.version,
            sha=None,
            docker_label=None,
            max_batch_total_tokens=c.max_batch_total_tokens,
            dtype=c.dtype,
            attention_backend=c.attention_backend,
        )

    async def _metrics(self) -> bytes:
        stats = None
        if self._client is not None and not self._client.dead:
            with contextlib.suppress(EngineError, TimeoutError):
                stats = await asyncio.wait_for(self._client.stats(), 5)
        return metrics.render(stats, self.in_flight, self.cfg.block_size)

    async def _tokenize(self, req: GenerateRequest, send: Send, cors: list) -> None:
        enc = self.tokenizer.encode(req.inputs, add_special_tokens=True)
        raw = req.inputs.encode()
        # Offsets come in characters; TGI reports bytes: one table, built in one pass.
        byte_at = [0, *itertools.accumulate(len(c.encode()) for c in req.inputs)]
        items = []
        for tok_id, (start, stop) in zip(enc.ids, enc.offsets, strict=True):
            b0, b1 = byte_at[start], byte_at[stop]
            items.append(TokenizeItem(tok_id, raw[b0:b1].decode(errors="replace"), b0, b1))
        await respond(send, 200, _json.encode(items), headers=cors)

    # ------------------------------------------------------------ generation

    def permit(self, n: int = 1) -> None:
        """429 unless `n` more requests may run (each sequence holds a permit while it runs)."""
        if self.in_flight + n > self.cfg.max_concurrent_requests:
            raise failed(429, "Model is overloaded", "overloaded")

    def _admit(self, req: GenerateRequest) -> ValidRequest:
        """Concurrency permit first, then validation, as in TGI."""
        self.permit()
        try:
            v = validate(req, self.cfg, self.tokenizer)
        except ValidationError as e:
            raise failed(422, f"Input validation error: {e}", "validation") from e
        self.permit(v.best_of)
        return v

    async def tokens(self, v: ValidRequest, gen: Generation) -> AsyncIterator[Token]:
        """Runs one request, holding a concurrency permit while it does."""
        assert self._client is not None
        self.in_flight += 1
        try:
            async for tok in run(self._client, self.tokenizer, self.special_ids, v, gen):
                yield tok
        finally:
            self.in_flight -= 1

    async def _generate(
        self,
        scope: Scope,
        req: GenerateRequest,
        receive: Receive,
        send: Send,
        cors: list,
        wrap: bool,
    ) -> None:
        t0 = time.perf_counter()
        v = self._admit(req)
        t_valid = time.perf_counter()
        # best_of > 1: that many sampled sequences (own seeds, own permits), best mean logprob wins.
        runs = [v, *(with_fresh_seed(v) for _ in range(v.best_of - 1))]
        gens = [Generation() for _ in runs]

        async def consume(one: ValidRequest, gen: Generation) -> None:
            async for _ in self.tokens(one, gen):
                pass

        work = run_all([consume(r, g) for r, g in zip(runs, gens, strict=True)])
        try:
            if not await until_disconnect(receive, work):
                metrics.failure("dropped")  # the client left: its requests were aborted
                return
        except (RequestError, EngineError) as e:
            raise engine_failure(e) from e
        if not all(g.finish_reason for g in gens):
            raise failed(500, "Incomplete generation", "incomplete_generation")
        best, resp = generate_response(req, runs, gens)
        v, gen = runs[best], gens[best]
        headers = [*cors, *timing_headers(req, v, gen, t0, t_valid)]
        count_success(scope, v, gen, t0, t_valid)
        body = _json.encode([resp] if wrap else resp)
        await respond(send, 200, body, headers=headers)

    async def _generate_stream(
        self, scope: Scope, req: GenerateRequest, receive: Receive, send: Send, cors: list
    ) -> None:
        headers = (
            SSE_HEADERS
            + cors
            + [
                (b"x-compute-type", compute_type()),
                (b"x-compute-characters", str(len(req.inputs)).encode()),
            ]
        )
        await send({"type": "http.response.start", "status": 200, "headers": headers})

        async def event(payload: object) -> None:
            await send(
                {"type": "http.response.body", "body": sse_event(payload), "more_body": True}
            )

        async def stream() -> None:
            t0 = time.perf_counter()
            p = req.parameters
            if p is not None and p.best_of not in (None, 1):
                raise failed(
                    422,
                    "Input validation error: `best_of` != 1 is not supported when streaming tokens",
                    "validation",
                )
            if p is not None and p.decoder_input_details:
                raise failed(
                    422,
                    "Input validation error: `decoder_input_details` == true is not "
                    "supported when streaming tokens",
                    "validation",
                )
            v = self._admit(req)
            t_valid = time.perf_counter()
            gen = Generation()
            try:
                async for tok in self.tokens(v, gen):
                    final = gen.finish_reason != ""
                    details = None
                    if final and v.details:
                        details = StreamDetails(
                            gen.finish_reason, len(gen.tokens), v.seed, len(v.prompt_ids)
                        )
                    text = full_text(req, v, gen.text) if final else None
                    top = gen.top_tokens[-1] if gen.top_tokens else []
                    await event(
                        StreamResponse(
                            index=len(gen.tokens),
                            token=tok,
                            top_tokens=top,
                            generated_text=text,
                            details=details,
                        )
                    )
            except (RequestError, EngineError) as e:
                raise engine_failure(e) from e
            if not gen.finish_reason:
                raise failed(500, "Incomplete generation stream", "incomplete_generation_stream")
            count_success(scope, v, gen, t0, t_valid)

        try:
            if await until_disconnect(receive, stream()):
                await send({"type": "http.response.body", "body": b""})
            else:
                metrics.failure("dropped")
        except HTTPError as e:  # streams report errors as an event, status stays 200
            body = b"data: " + e.body + b"\n\n"
            await send({"type": "http.response.body", "body": body, "more_body": False})


def failed(status: int, message: str, error_type: str) -> HTTPError:
    """A TGI error answer, counted in the failure metric by its type."""
    metrics.failure(error_type)
    return HTTPError.json(status, message, error_type)


def engine_failure(e: Exception) -> HTTPError:
    """How an engine-side error reaches the client."""
    if isinstance(e, RequestError):  # refused by the scheduler (e.g. beyond the KV capacity)
        return failed(422, f"Input validation error: {e}", "validation")
    if isinstance(e, ShuttingDownError):  # the grace period of a SIGTERM is over
        return failed(503, str(e), "shutting_down")
    return failed(424, f"Request failed during generation: {e}", "generation")


app = App()
