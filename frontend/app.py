"""The HTTP frontend as an ASGI app (served by granian, one per worker): CORS, auth,
routing to TGI's API (`tgi_api`) or OpenAI's (`openai_api`), and errors answered
in the shape of the route's API.

Each worker owns a tokenizer and an `EngineClient`; it validates, tokenizes,
detokenizes and matches stop strings, and only token ids cross to the
scheduler. A client that goes away mid-stream cancels its handler, which
aborts the request in the scheduler and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgspec
from tokenizers import Tokenizer

from tgi_mp.frontend import access, dashboard, errors, metrics, tracing
from tgi_mp.frontend.config import FrontendConfig
from tgi_mp.frontend.engine_client import EngineClient, EngineError
from tgi_mp.frontend.errors import ApiError
from tgi_mp.frontend.generation import Generation, run
from tgi_mp.frontend.http import (
    Headers,
    Receive,
    Scope,
    Send,
    header,
    read_body,
    respond,
    respond_json,
)
from tgi_mp.frontend.openai_api import OpenAIRoutes
from tgi_mp.frontend.openapi import DOCS_ASSETS, DOCS_HTML, docs_asset, openapi_document
from tgi_mp.frontend.tgi_api import TgiRoutes
from tgi_mp.frontend.tgi_protocol import Token, Version
from tgi_mp.frontend.validation import ValidRequest
from tgi_mp.ipc.messages import SchedulerStats
from tgi_mp.process import bind_to_parent, setup_logging

CONFIG_ENV = "TGI_MP_FRONTEND_CONFIG"
T = TypeVar("T")
log = logging.getLogger("tgi_mp.frontend")

# TGI's routes that need the API key (OpenAI's: every POST under /v1/).
_TGI_POSTS = ("/generate", "/generate_stream", "/", "/tokenize", "/chat_tokenize")
# POST routes a GET is a 405 on (`/` is also GET's health check).
_POST_ONLY = ("/generate", "/generate_stream", "/tokenize", "/chat_tokenize", "/invocations")


def _without_body(send: Send) -> Send:
    """`send` for a HEAD request: the response's start, then an empty body."""

    async def headless(msg: dict) -> None:
        if msg["type"] == "http.response.body":
            msg = {**msg, "body": b""}
        await send(msg)

    return headless


class App:
    def __init__(self, cfg: FrontendConfig | None = None) -> None:
        self._cfg = cfg
        self.client: EngineClient | None = None
        self.in_flight = 0
        self.validating = 0  # requests whose validation runs in the threads
        self._pool: ThreadPoolExecutor | None = None

    @property
    def cfg(self) -> FrontendConfig:
        if self._cfg is None:
            with open(os.environ[CONFIG_ENV], "rb") as f:
                self._cfg = msgspec.msgpack.decode(f.read(), type=FrontendConfig)
        return self._cfg

    def _start(self) -> None:
        if self.client is None:
            cfg = self.cfg
            if not logging.getLogger().handlers:  # a granian worker: tgi-mp's log lines
                setup_logging("frontend")
            self.tokenizer = Tokenizer.from_file(os.path.join(cfg.tokenizer_dir, "tokenizer.json"))
            self.special_ids = set(self.tokenizer.get_added_tokens_decoder())
            metrics.configure(
                os.path.join(cfg.ipc_root, "metrics"),
                cfg.max_input_tokens,
                cfg.max_total_tokens,
                cfg.lora_adapters,
            )
            # Proxies, not cycles: an App collected by refcount closes its ZeroMQ context
            # in order, while a cycle's collector may term the context before its sockets
            # are closed (and block forever).
            self.tgi = TgiRoutes(weakref.proxy(self))
            self.openai = OpenAIRoutes(weakref.proxy(self))
            if cfg.otlp_endpoint:
                tracing.setup(cfg.otlp_endpoint, cfg.otlp_service_name)
            self.client = EngineClient(cfg.ipc_root)

    # ------------------------------------------------------------ ASGI entry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        self._start()
        entry = access.begin(scope)
        send = access.sending(send, entry)
        if scope["method"] == "HEAD":  # wherever GET works: its status and headers, no body
            scope, send = {**scope, "method": "GET"}, _without_body(send)
        cors = self._cors_headers(scope)
        api = "openai" if scope["path"].startswith("/v1/") else "tgi"
        try:
            await self._route(scope, receive, send, cors)
        except ApiError as e:
            await respond(send, e.status, e.render(api), headers=cors + e.headers)
        except Exception as e:  # a bug: answer it, log it, keep serving everyone else
            log.exception(
                "unhandled error on %s %s",
                scope["method"],
                scope["path"],
                extra={"request_id": entry.request_id},
            )
            body = errors.internal(e).render(api)
            try:  # unless the response had already started
                await respond(send, 500, body, headers=cors)
            except Exception:
                log.debug("the 500 could not be sent", exc_info=True)
        finally:
            access.end(entry, self.cfg.access_log)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                # A granian worker dies with granian, which dies with tgi-mp serve.
                bind_to_parent(os.getppid())
                self._start()
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                if self.client is not None:
                    self.client.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _cors_headers(self, scope: Scope) -> Headers:
        allowed = self.cfg.cors_allow_origin
        origin = header(scope, b"origin")
        if not allowed:
            value = "*"
        elif origin in allowed:
            value = origin
        else:
            return []
        return [(b"access-control-allow-origin", value.encode()), (b"vary", b"origin")]

    async def _route(self, scope: Scope, receive: Receive, send: Send, cors: Headers) -> None:
        method, path = scope["method"], scope["path"]
        if method == "OPTIONS":  # CORS preflight
            # The headers the browser asks for (the OpenAI SDKs send x-stainless-*), else
            # the two every client needs.
            asked = header(scope, b"access-control-request-headers")
            extra = [
                (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                (
                    b"access-control-allow-headers",
                    (asked or "content-type, authorization").encode(),
                ),
                (b"access-control-max-age", b"600"),
            ]
            await respond(send, 200, b"", None, cors + extra)
        elif path.startswith("/v1/"):
            await self.openai.handle(scope, receive, send, cors)
        elif method == "GET" and path not in _POST_ONLY:
            await self._get(scope, send, cors)
        elif path not in _TGI_POSTS and path not in _POST_ONLY:
            raise errors.not_found(method, path)
        elif method != "POST":
            raise errors.method_not_allowed(method, path, "GET, POST" if path == "/" else "POST")
        elif path == "/invocations":
            await self._invocations(scope, receive, send, cors)
        else:
            self.check_key(scope)
            body = await read_body(scope, receive, self.cfg.payload_limit)
            await self.tgi.handle_post(scope, path, body, receive, send, cors)

    async def _invocations(self, scope: Scope, receive: Receive, send: Send, cors: Headers) -> None:
        """SageMaker's route (TGI's and vLLM's): chat when the body has `messages`, an
        OpenAI completion when it has `prompt`, else TGI's `POST /`."""
        self.check_key(scope)
        body = await read_body(scope, receive, self.cfg.payload_limit)
        try:
            keys = msgspec.json.decode(body, type=dict[str, msgspec.Raw])
        except (msgspec.DecodeError, RecursionError):
            keys = {}
        if "messages" in keys:
            await self.openai.post(scope, "/v1/chat/completions", body, receive, send, cors)
        elif "prompt" in keys:
            await self.openai.post(scope, "/v1/completions", body, receive, send, cors)
        else:
            await self.tgi.handle_post(scope, "/", body, receive, send, cors)

    async def _get(self, scope: Scope, send: Send, cors: Headers) -> None:
        path = scope["path"]
        if path in ("/health", "/ping", "/"):
            await self.tgi.health(send, cors)
        elif path == "/info":
            await self.tgi.info(send, cors)
        elif path == "/metrics":
            await self.tgi.metrics(send, cors)
        elif path == "/api-doc/openapi.json":
            await respond(send, 200, openapi_document(self.cfg.version), headers=cors)
        elif path == "/docs":
            await respond(send, 200, DOCS_HTML, b"text/html; charset=utf-8", cors)
        elif path.startswith("/docs/") and path[6:] in DOCS_ASSETS:
            await respond(send, 200, docs_asset(path[6:]), DOCS_ASSETS[path[6:]], cors)
        elif path == "/version":
            await respond_json(send, Version(self.cfg.version), cors)
        elif path == "/dashboard":  # the page holds no figures: they need the key
            await respond(send, 200, dashboard.page(), b"text/html; charset=utf-8", cors)
        elif path == "/dashboard/data":
            self.check_key(scope)
            stats = await self.engine_stats()
            await respond_json(send, dashboard.summary(self.cfg, stats, self.in_flight), cors)
        else:
            raise errors.not_found("GET", path)

    def check_key(self, scope: Scope) -> None:
        """401 unless the request carries the API key (when the server has one)."""
        key = self.cfg.api_key
        given = header(scope, b"authorization") or ""
        if key and given.lower() != f"bearer {key}".lower():
            raise errors.unauthorized()

    # ------------------------------------------------------------ what both APIs share

    async def engine_stats(self) -> SchedulerStats | None:
        """The scheduler's figures now; None when the engine is down or does not answer."""
        if self.client is None or self.client.dead:
            return None
        with contextlib.suppress(EngineError, TimeoutError):
            return await asyncio.wait_for(self.client.stats(), 5)
        return None

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the validation threads (`--validation-workers`): tokenizing and
        templating a 2 MB prompt must not stall the event loop every stream runs on."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.cfg.validation_workers, "validation")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def permit(self, n: int = 1) -> None:
        """429 unless `n` more requests may run (each sequence holds a permit while it
        runs; a request being validated holds one too)."""
        if self.in_flight + self.validating + n > self.cfg.max_concurrent_requests:
            raise errors.overloaded()

    async def validated(self, fn: Callable[..., T], *args: Any) -> T:
        """`off_loop(fn, *args)` holding a permit meanwhile, so a burst of requests cannot
        all pass the check while their validations wait in the threads."""
        self.permit()
        self.validating += 1
        try:
            return await self.off_loop(fn, *args)
        finally:
            self.validating -= 1

    async def tokens(self, v: ValidRequest, gen: Generation) -> AsyncIterator[Token]:
        """Runs one sequence, holding a concurrency permit while it does."""
        assert self.client is not None
        self.in_flight += 1
        try:
            async for tok in run(self.client, self.tokenizer, self.special_ids, v, gen):
                yield tok
        finally:
            self.in_flight -= 1


app = App()
