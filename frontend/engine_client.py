"""The frontend's handle on the engine: token ids in, token ids out, asyncio.

One receiver task reads the scheduler's `TokenBatch`es and routes each token
to its request's queue; it also listens for `EngineDead` from the
supervisor, and fails every pending request at once when it arrives.
Leaving a `generate` loop early (a client disconnect) aborts the request,
which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import zmq
import zmq.asyncio

from tgi_mp.ipc import messages as m
from tgi_mp.ipc.channels import Endpoints, FrontendChannels

_client_numbers = itertools.count()
log = logging.getLogger("tgi_mp.frontend")


class EngineError(RuntimeError):
    """The engine failed this request (or died)."""


class RequestError(ValueError):
    """The engine refused this request."""


class ShuttingDownError(EngineError):
    """The server's grace period ended before this request did (503)."""


@dataclass(slots=True)
class TokenOutput:
    token_id: int  # -1 when the request ended without a new token
    finish_reason: m.FinishReason | None = None
    logprob: float = float("nan")
    # The step's most likely (id, logprob) pairs, when the batch asked for any;
    # a request takes the first `top_n_tokens` of them.
    top: list[tuple[int, float]] | None = None
    # With a request's first token, when it asked: logprob of each prompt token (0: NaN).
    prompt_logprobs: list[float] | None = None
    # With it, when the request asked for prompt_top_k >= 0: per prompt position the
    # token's rank and the (id, logprob) of the most likely tokens (row 0: unscored).
    prompt_tops: tuple[list[int], list[list[tuple[int, float]]]] | None = None
    cached_tokens: int | None = None  # with the first token: prompt tokens the cache served


class EngineClient:
    def __init__(self, ipc_root: str) -> None:
        self._ctx = zmq.asyncio.Context()
        # Unique per client, across processes and within one: the scheduler routes replies by it.
        self.identity = f"f{os.getpid()}-{next(_client_numbers)}".encode()
        self._ch = FrontendChannels(self._ctx, Endpoints(ipc_root), self.identity)
        self._ids = itertools.count(1)
        self._queues: dict[int, asyncio.Queue[TokenOutput | BaseException]] = {}
        self._receiver: asyncio.Task | None = None
        # The scheduler answers GetStats in order on this socket: first asked, first served.
        self._stats_waiters: collections.deque[asyncio.Future[m.SchedulerStats]] = (
            collections.deque()
        )
        self.dead: str | None = None
        self.dead_error: type[EngineError] = EngineError

    def _ensure_receiver(self) -> None:
        if self._receiver is None:
            self._receiver = asyncio.get_running_loop().create_task(self._receive())

    async def generate(
        self, prompt_ids: list[int] | np.ndarray, params: m.SamplingParams
    ) -> AsyncIterator[TokenOutput]:
        if self.dead:
            raise self.dead_error(self.dead)
        self._ensure_receiver()
        req_id = next(self._ids)
        queue: asyncio.Queue[TokenOutput | BaseException] = asyncio.Queue()
        self._queues[req_id] = queue
        prompt = np.asarray(prompt_ids, dtype=np.int32)
        finished = False
        try:
            await self._ch.scheduler.send(m.AddRequest(req_id, prompt, params))
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            del self._queues[req_id]
            if not finished and not self.dead:
                await self.abort(req_id)

    async def abort(self, req_id: int) -> None:
        await self._ch.scheduler.send(m.AbortRequest([req_id]))

    async def stats(self) -> m.SchedulerStats:
        self._ensure_receiver()
        waiter = asyncio.get_running_loop().create_future()
        self._stats_waiters.append(waiter)
        await self._ch.scheduler.send(m.GetStats())
        return await waiter

    async def _receive(self) -> None:
        poller = zmq.asyncio.Poller()
        sched, events = self._ch.scheduler, self._ch.events
        poller.register(sched.sock, zmq.POLLIN)
        poller.register(events.sock, zmq.POLLIN)
        while True:
            ready = dict(await poller.poll())
            if events.sock in ready:
                msg = events.decode(await events.sock.recv_multipart(copy=False))
                error = EngineError
                if isinstance(msg, m.ShuttingDown):
                    error = ShuttingDownError
                    log.warning("shutting down: %d requests cut", len(self._queues))
                self._fail_all(msg.message, error)
                return
            if sched.sock in ready:
                self._dispatch(sched.decode(await sched.sock.recv_multipart(copy=False)))

    def _dispatch(self, msg: m.SchedulerToFrontend) -> None:
        queues = self._queues
        if isinstance(msg, m.TokenBatch):
            finished = dict(msg.finished)
            rows = zip(
                msg.req_ids.tolist(), msg.token_ids.tolist(), msg.logprobs.tolist(), strict=True
            )
            top_ids = msg.top_ids.tolist() if msg.top_ids is not None else None
            top_lps = msg.top_logprobs.tolist() if msg.top_logprobs is not None else None
            prompt_lps = {req_id: lps.tolist() for req_id, lps in msg.prompt_logprobs}
            prompt_tops = {
                req_id: (
                    ranks.tolist(),
                    [
                        list(zip(i, v, strict=True))
                        for i, v in zip(ids.tolist(), lps.tolist(), strict=True)
                    ],
                )
                for req_id, ranks, ids, lps in msg.prompt_tops
            }
            cached = dict(msg.num_cached_tokens)
            # A request may have several tokens in one batch (speculative decoding): its
            # finish goes with its last.
            last = {req_id: i for i, req_id in enumerate(msg.req_ids.tolist())}
            for i, (req_id, token, logprob) in enumerate(rows):
                q = queues.get(req_id)
                if q is not None:
                    reason = finished.pop(req_id, None) if last[req_id] == i else None
                    finish = None if reason is None else m.FinishReason(reason)
                    out = TokenOutput(token, finish, logprob)
                    if top_ids is not None:
                        out.top = list(zip(top_ids[i], top_lps[i], strict=True))
                    if prompt_lps:  # with its first token only
                        out.prompt_logprobs = prompt_lps.pop(req_id, None)
                        out.prompt_tops = prompt_tops.pop(req_id, None)
                    if cached:
                        out.cached_tokens = cached.pop(req_id, None)
                    q.put_nowait(out)
            for req_id, reason in finished.items():  # ended without a token this step
                if (q := queues.get(req_id)) is not None:
                    q.put_nowait(TokenOutput(-1, m.FinishReason(reason)))
        elif isinstance(msg, m.Error):
            err = RequestError if msg.kind == "validation" else EngineError
            if msg.req_id < 0:
                self._fail_all(msg.message)
            elif (q := queues.get(msg.req_id)) is not None:
                q.put_nowait(err(msg.message))
        elif isinstance(msg, m.SchedulerStats) and self._stats_waiters:
            waiter = self._stats_waiters.popleft()
            if not waiter.done():  # its caller may have given up (a timeout)
                waiter.set_result(msg)

    def _fail_all(self, message: str, error: type[EngineError] = EngineError) -> None:
        self.dead = message
        self.dead_error = error
        for q in self._queues.values():
            q.put_nowait(error(message))
        while self._stats_waiters:
            waiter = self._stats_waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error(message))

    def close(self) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
        self._ch.close()
        self._ctx.term()
