"""The sockets of one tgi-mp instance, all in one place.

```
 frontend k   DEALER (id f<k>) ──connect──▶ ROUTER  scheduler   requests in, tokens out
 scheduler    XPUB  ◀──connect── SUB        executor × N        one plan write, N readers
 executor r   PUSH  ──connect──▶ PULL       scheduler           results, readiness, failures
 scheduler    PUSH  ──connect──▶ PULL       supervisor          SchedulerReady
 supervisor   PUB   ◀──connect── SUB        frontend k          EngineDead, ShuttingDown
```

Endpoints are `ipc://` files in a private temporary directory made by the
supervisor; nothing listens on TCP. The plan's large arrays go through a
shared-memory ring (`ipc.shm`) when the supervisor made one: written once, read
by every executor in place. Every socket has linger 0 so a dying
peer never blocks shutdown. High-water marks are off on the plan and result
sockets: dropping a step would corrupt the KV bookkeeping, so a slow reader
must slow the writer down instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from tgi_mp.ipc import messages as m
from tgi_mp.ipc.codec import Decoder, Encoder
from tgi_mp.ipc.shm import Ring, RingReader, RingSpec, RingWriter

# How long the scheduler waits for an executor to release a ring slot before it
# calls it stalled. Ranks advance in lockstep, so a slot 8 messages old is held only
# by a hung or dead reader (whose death the supervisor reports meanwhile).
RING_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Endpoints:
    root: str

    @classmethod
    def create(cls) -> Endpoints:
        return cls(tempfile.mkdtemp(prefix="tgi-mp-"))

    def _addr(self, name: str) -> str:
        return f"ipc://{os.path.join(self.root, name)}"

    @property
    def frontend(self) -> str:
        return self._addr("frontend")

    @property
    def plan(self) -> str:
        return self._addr("plan")

    @property
    def results(self) -> str:
        return self._addr("results")

    @property
    def supervisor(self) -> str:
        return self._addr("supervisor")

    @property
    def events(self) -> str:
        return self._addr("events")

    def remove(self) -> None:
        """Deletes the socket files and anything else the instance kept there."""
        shutil.rmtree(self.root, ignore_errors=True)


class Channel:
    """One socket with the codec for what it sends and what it receives."""

    def __init__(
        self,
        sock: zmq.Socket,
        recv_type: Any = None,
        ring_writer: RingWriter | None = None,
        ring_reader: RingReader | None = None,
    ) -> None:
        self.sock = sock
        self.ring_writer = ring_writer
        self.decode_time = 0.0  # of the last message received
        self._enc = Encoder(ring_writer)
        self._dec = Decoder(recv_type, ring_reader) if recv_type is not None else None

    def send(self, msg: msgspec.Struct, routing_id: bytes | None = None) -> Any:
        """Returns what pyzmq returns: None, or an awaitable on asyncio sockets."""
        frames = self._enc.encode(msg)
        if routing_id is not None:
            frames = [routing_id, *frames]
        return self.sock.send_multipart(frames, copy=False)

    def recv(self) -> Any:
        frames = self.sock.recv_multipart(copy=False)
        t0 = time.perf_counter()
        msg = self.decode(frames)
        self.decode_time = time.perf_counter() - t0
        return msg

    def recv_routed(self) -> tuple[bytes, Any]:
        """For ROUTER sockets: (peer id, message)."""
        frames = self.sock.recv_multipart(copy=False)
        return frames[0].bytes, self.decode(frames[1:])

    def decode(self, frames: list[Any]) -> Any:
        assert self._dec is not None, "this channel only sends"
        return self._dec.decode(frames)

    def release(self) -> None:
        """The arrays of every message received so far are no longer read: their ring
        slots may be reused (a no-op without a ring)."""
        if self._dec is not None and self._dec.ring is not None:
            self._dec.ring.release()

    def close(self, linger: int = 0) -> None:
        self.sock.close(linger=linger)


def _socket(ctx: zmq.Context, kind: int, addr: str, bind: bool, **opts: Any) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in opts.items():
        sock.setsockopt(getattr(zmq, name), value)
    (sock.bind if bind else sock.connect)(addr)
    return sock


# ---------------------------------------------------------------- per process


class SchedulerChannels:
    def __init__(self, ctx: zmq.Context, ep: Endpoints, ring: RingSpec | None = None) -> None:
        self.frontend = Channel(_socket(ctx, zmq.ROUTER, ep.frontend, True), m.FrontendMessage)
        # XPUB_VERBOSE: every executor's subscription reaches us, so we can
        # wait for all N before the first plan (no slow-joiner loss).
        writer = RingWriter(Ring(ring), RING_TIMEOUT_S) if ring is not None else None
        self.plan = Channel(
            _socket(ctx, zmq.XPUB, ep.plan, True, SNDHWM=0, XPUB_VERBOSE=1), ring_writer=writer
        )
        self.results = Channel(
            _socket(ctx, zmq.PULL, ep.results, True, RCVHWM=0), m.ExecutorToScheduler
        )
        self.supervisor = Channel(_socket(ctx, zmq.PUSH, ep.supervisor, False))

    def wait_for_subscribers(self, n: int, timeout_ms: int) -> None:
        seen = 0
        while seen < n:
            if not self.plan.sock.poll(timeout_ms):
                raise TimeoutError(f"only {seen} of {n} executors subscribed to the step plan")
            if self.plan.sock.recv()[:1] == b"\x01":
                seen += 1

    def close(self, linger: int = 0) -> None:
        for ch in (self.frontend, self.plan, self.results, self.supervisor):
            ch.close(linger)


class ExecutorChannels:
    def __init__(
        self, ctx: zmq.Context, ep: Endpoints, ring: RingSpec | None = None, rank: int = 0
    ) -> None:
        reader = RingReader(Ring(ring), rank) if ring is not None else None
        self.plan = Channel(
            _socket(ctx, zmq.SUB, ep.plan, False, RCVHWM=0, SUBSCRIBE=b""),
            m.SchedulerToExecutor,
            ring_reader=reader,
        )
        self.results = Channel(_socket(ctx, zmq.PUSH, ep.results, False, SNDHWM=0))

    def close(self, linger: int = 0) -> None:
        """`linger` (ms) lets a last failure report leave before the socket goes."""
        self.plan.close()
        self.results.close(linger)


class SupervisorChannels:
    def __init__(self, ctx: zmq.Context, ep: Endpoints) -> None:
        self.control = Channel(_socket(ctx, zmq.PULL, ep.supervisor, True), m.SupervisorMessage)
        self.events = Channel(_socket(ctx, zmq.PUB, ep.events, True))

    def close(self) -> None:
        self.control.close()
        self.events.close()


class FrontendChannels:
    """asyncio sockets of one frontend process (or one engine client)."""

    def __init__(self, ctx: zmq.asyncio.Context, ep: Endpoints, identity: bytes) -> None:
        self.scheduler = Channel(
            _socket(ctx, zmq.DEALER, ep.frontend, False, ROUTING_ID=identity),
            m.SchedulerToFrontend,
        )
        self.events = Channel(
            _socket(ctx, zmq.SUB, ep.events, False, SUBSCRIBE=b""), m.SupervisorEvent
        )

    def close(self) -> None:
        self.scheduler.close()
        self.events.close()
