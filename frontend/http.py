"""Just enough ASGI: read a bounded body, decode JSON, answer JSON, stream SSE.

TGI's transport rules live here: body-size limit (413), content type (415),
JSON syntax and nesting depth (400) and JSON types (422), with axum's messages
(as `ApiError`s, so every client gets a JSON body it can parse).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from tgi_mp.frontend import errors, metrics
from tgi_mp.frontend.errors import Api, ApiError

Scope = dict[str, Any]
Receive = Any
Send = Any
Headers = list[tuple[bytes, bytes]]

SSE_HEADERS: Headers = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]

_json = msgspec.json.Encoder()
log = logging.getLogger("tgi_mp.frontend")


@functools.cache
def _decoder(type_: Any) -> msgspec.json.Decoder:
    return msgspec.json.Decoder(type_)


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    length = header(scope, b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise errors.payload_too_large()
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ApiError(400, "The client disconnected", "dropped")  # answered to nobody
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise errors.payload_too_large()
        chunks.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(chunks)


def decode_json(scope: Scope, body: bytes, type_: Any) -> Any:
    ctype = header(scope, b"content-type") or ""
    if "application/json" not in ctype.lower():
        raise errors.unsupported_media_type()
    try:
        return _decoder(type_).decode(body)
    except msgspec.ValidationError as e:
        raise errors.wrong_json_types(str(e)) from e
    except msgspec.DecodeError as e:
        raise errors.malformed_json(str(e)) from e
    except RecursionError as e:  # msgspec's decoder recurses once per nesting level
        raise errors.malformed_json("the JSON is nested too deeply") from e


async def respond(
    send: Send,
    status: int,
    body: bytes = b"",
    content_type: bytes | None = b"application/json",
    headers: Headers | None = None,
) -> None:
    hdrs = list(headers or [])
    if content_type is not None and body:
        hdrs.append((b"content-type", content_type))
    hdrs.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


async def respond_json(send: Send, payload: Any, headers: Headers) -> None:
    await respond(send, 200, _json.encode(payload), headers=headers)


async def until_disconnect(receive: Receive, work: Awaitable[None]) -> bool:
    """Runs `work` unless the client disconnects first, which cancels it (and so aborts
    its requests in the scheduler, and counts them as dropped). True when `work`
    completed; its errors propagate."""
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
            metrics.failure("dropped")
            return False
        task.result()
        return True
    finally:
        watcher.cancel()


# A comment line on a stream that has had no event for this long (a request queued or
# prefilling a long prompt), so proxies and load balancers keep it open (TGI's axum
# keep-alive sends one every 15 s too). Clients skip comment lines.
SSE_KEEPALIVE_S = 15.0
KEEPALIVE = b": keep-alive\n\n"


async def _with_keepalive(
    events: AsyncIterator[Any], body: Callable[[bytes], Awaitable[None]]
) -> AsyncIterator[Any]:
    """`events`, sending a keep-alive comment whenever the next one is slow to come."""
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=SSE_KEEPALIVE_S)
            if not done:
                await body(KEEPALIVE)
                continue
            task, pending = pending, None
            try:
                event = task.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        if pending is not None:  # the stream ends early: stop the pending step first
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending


async def stream_sse(
    receive: Receive,
    send: Send,
    headers: Headers,
    api: Api,
    events: AsyncIterator[Any],
    done: bytes | None = None,
) -> None:
    """Streams `events` as server-sent events, status 200 whatever happens: an error
    raised while producing them is the last event (then `done`, for APIs that end
    with one). A client that leaves closes `events`, which aborts their requests."""
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + headers})

    async def body(data: bytes, more: bool = True) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": more})

    async def produce() -> None:
        try:
            async with contextlib.aclosing(events) as it:
                async for event in _with_keepalive(it, body):
                    await body(b"data: " + _json.encode(event) + b"\n\n")
        except ApiError as e:
            await body(b"data: " + e.render(api) + b"\n\n")
        except Exception as e:  # a bug: the stream still ends with an error event
            log.exception("unhandled error in a stream")
            await body(b"data: " + errors.internal(e).render(api) + b"\n\n")
        if done is not None:
            await body(b"data: " + done + b"\n\n")
        await body(b"", more=False)

    await until_disconnect(receive, produce())
