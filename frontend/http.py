"""Just enough ASGI: read a bounded body, answer JSON / text, stream SSE.

TGI's transport rules live here: body-size limit (413), content type (415),
JSON syntax and nesting depth (400) and JSON types (422), with axum's messages.
Unlike axum they answer a JSON error body, so every client can parse every error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable
from typing import Any

import msgspec

Scope = dict[str, Any]
Receive = Any
Send = Any

SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]

_json = msgspec.json.Encoder()


@functools.cache
def _decoder(type_: Any) -> msgspec.json.Decoder:
    return msgspec.json.Decoder(type_)


class HTTPError(Exception):
    """An answer short of the handler's normal one."""

    def __init__(self, status: int, body: bytes = b"", content_type: bytes = b"text/plain") -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body
        self.content_type = content_type

    @classmethod
    def json(cls, status: int, error: str, error_type: str) -> HTTPError:
        body = _json.encode({"error": error, "error_type": error_type})
        return cls(status, body, b"application/json")


# What a request is refused for before any handler reads it: TGI's (axum's) messages,
# with an error_type of tgi-mp's naming (axum gives none).
def payload_too_large() -> HTTPError:
    msg = "Failed to buffer the request body: length limit exceeded"
    return HTTPError.json(413, msg, "payload_too_large")


def malformed_json(detail: str) -> HTTPError:
    msg = f"Failed to parse the request body as JSON: {detail}"
    return HTTPError.json(400, msg, "invalid_json")


def wrong_json_types(detail: str) -> HTTPError:
    msg = f"Failed to deserialize the JSON body into the target type: {detail}"
    return HTTPError.json(422, msg, "validation")


def not_found(method: str, path: str) -> HTTPError:
    return HTTPError.json(404, f"No route {method} {path}", "not_found")


def method_not_allowed(method: str, path: str) -> HTTPError:
    return HTTPError.json(405, f"Method {method} is not allowed on {path}", "method_not_allowed")


def unauthorized() -> HTTPError:
    return HTTPError.json(401, "Invalid or missing API key", "unauthorized")


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    length = header(scope, b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise payload_too_large()
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise HTTPError.json(400, "client disconnected", "dropped")
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise payload_too_large()
        chunks.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(chunks)


def decode_json(scope: Scope, body: bytes, type_: Any) -> Any:
    ctype = header(scope, b"content-type") or ""
    if "application/json" not in ctype.lower():
        raise HTTPError.json(
            415, "Expected request with `Content-Type: application/json`", "unsupported_media_type"
        )
    try:
        return _decoder(type_).decode(body)
    except msgspec.ValidationError as e:
        raise wrong_json_types(str(e)) from e
    except msgspec.DecodeError as e:
        raise malformed_json(str(e)) from e
    except RecursionError as e:  # msgspec's decoder recurses once per nesting level
        raise malformed_json("the JSON is nested too deeply") from e


async def respond(
    send: Send,
    status: int,
    body: bytes = b"",
    content_type: bytes | None = b"application/json",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    hdrs = list(headers or [])
    if content_type is not None and body:
        hdrs.append((b"content-type", content_type))
    hdrs.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


def sse_event(payload: Any) -> bytes:
    return b"data: " + _json.encode(payload) + b"\n\n"


async def until_disconnect(receive: Receive, work: Awaitable[None]) -> bool:
    """Runs `work` unless the client disconnects first, which cancels it (and so aborts
    its request in the scheduler). True when `work` completed; its errors propagate."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return False
        task.result()
        return True
    finally:
        watcher.cancel()
