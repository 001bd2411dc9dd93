"""The access log: one line per HTTP request (method, route, status, latency, tokens in
and out, request id), and the request id itself: the client's `x-request-id`, else a
new one, echoed on the response and carried into the log lines and trace spans of the
request. `--disable-access-log` turns the lines off."""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from tgi_mp.frontend import metrics
from tgi_mp.frontend.http import Scope, Send, header
from tgi_mp.frontend.openapi import documented_routes

log = logging.getLogger("tgi_mp.access")
_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a client's id is echoed only if it is plain
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")


@dataclass
class Entry:
    method: str
    path: str
    route: str  # the path as a metrics label: one of the server's routes, or "other"
    request_id: str
    start: float = field(default_factory=time.perf_counter)
    status: int = 0
    tokens_in: int = 0
    tokens_out: int = 0


# The request being served (mutated, not replaced: tasks copy the context they start in).
_current: contextvars.ContextVar[Entry | None] = contextvars.ContextVar("request", default=None)


def begin(scope: Scope) -> Entry:
    given = header(scope, b"x-request-id") or ""
    rid = given if _ID.fullmatch(given) else uuid.uuid4().hex
    # As sent (percent-encoded), printable ASCII only: a path cannot forge log lines.
    raw = scope.get("raw_path") or scope["path"].encode("utf-8", "replace")
    path = _UNPRINTABLE.sub("?", raw.decode("latin-1"))
    entry = Entry(scope["method"], path, route_label(scope["path"]), rid)
    _current.set(entry)
    return entry


def current() -> Entry | None:
    return _current.get()


def count_tokens(tokens_in: int, tokens_out: int) -> None:
    """The request's prompt and generated tokens, for its line."""
    if (entry := _current.get()) is not None:
        entry.tokens_in, entry.tokens_out = tokens_in, tokens_out


def sending(send: Send, entry: Entry) -> Send:
    """`send` that records the status and adds the `x-request-id` header."""

    async def wrapped(msg: dict) -> None:
        if msg["type"] == "http.response.start":
            entry.status = msg["status"]
            headers = [*msg.get("headers", ()), (b"x-request-id", entry.request_id.encode())]
            msg = {**msg, "headers": headers}
        await send(msg)

    return wrapped


_UNDOCUMENTED = frozenset({"/ping", "/docs", "/api-doc/openapi.json"})


def route_label(path: str) -> str:
    """The route `path` is served by, so labels stay few whatever paths clients send."""
    if path in _UNDOCUMENTED or path in documented_routes():
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith("/docs/"):
        return "/docs/{asset}"
    return "other"


def end(entry: Entry, enabled: bool) -> None:
    """The request's line in the access log, and its response in the metrics."""
    metrics.response(entry.route, entry.status)
    if enabled:
        ms = (time.perf_counter() - entry.start) * 1000
        log.info(
            "%s %s %d %.1fms in=%d out=%d id=%s",
            entry.method,
            entry.path,
            entry.status,
            ms,
            entry.tokens_in,
            entry.tokens_out,
            entry.request_id,
            extra={
                "request_id": entry.request_id,
                "method": entry.method,
                "route": entry.path,
                "status": entry.status,
                "latency_ms": round(ms, 2),
                "tokens_in": entry.tokens_in,
                "tokens_out": entry.tokens_out,
            },
        )
