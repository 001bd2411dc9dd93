"""`GET /dashboard`: a live page of the server, and `GET /dashboard/data`, the JSON
summary it polls, computed from the same figures `/metrics` serves (every HTTP
worker's request metrics plus the scheduler's), so the two never disagree.

Rates and percentiles are over the last `WINDOW_S` seconds: each worker keeps the
totals it saw at its recent polls and differences them (histogram buckets included).
A worker's first poll has nothing to difference: its rates are null and its
percentiles are since start (`window_s` 0).
"""

from __future__ import annotations

import functools
import time
from collections import deque
from importlib import resources

import msgspec

from tgi_mp.frontend import metrics
from tgi_mp.frontend.config import FrontendConfig
from tgi_mp.ipc.messages import DURATION_BUCKETS, SchedulerStats

WINDOW_S = 10.0
_MIN_S = 0.5  # a shorter window gives no rates
_KEEP_S = 60.0  # samples older than this are dropped


class Percentiles(msgspec.Struct):
    """Seconds; null with no observation."""

    p50: float | None
    p90: float | None
    p99: float | None


class RouteErrors(msgspec.Struct):
    route: str
    status: int
    total: float  # since start
    in_window: float


class ServerInfo(msgspec.Struct):
    model_id: str
    served_model_name: str
    version: str
    dtype: str
    attention_backend: str
    num_shards: int
    lora_adapters: list[str]
    max_concurrent_requests: int  # of each HTTP worker
    max_input_tokens: int
    max_total_tokens: int
    max_batch_total_tokens: int
    block_size: int


class EngineFigures(msgspec.Struct):
    """The scheduler's, now (null fields: the engine did not answer)."""

    queue_size: int
    running: int
    kv_blocks_used: int
    kv_blocks_cached: int  # holding a cached prefix, in use or evictable
    kv_blocks_free: int  # incl. evictable cached ones
    kv_blocks_total: int
    preemptions: int  # since start
    prefix_cache_hit_rate: float | None  # hit / admitted tokens in the window
    steps_per_s: float | None


class Dashboard(msgspec.Struct):
    time: float  # unix seconds
    window_s: float  # what rates and percentiles cover; 0: since start, no rates
    info: ServerInfo
    requests_total: float
    successes_total: float
    generated_tokens_total: float
    in_flight: int  # in the worker that answered
    request_rate: float | None  # generation requests ended per second (any outcome)
    success_rate: float | None
    output_tokens_per_s: float | None
    input_tokens_per_s: float | None
    ttft_s: Percentiles
    itl_s: Percentiles
    errors: list[RouteErrors]
    engine: EngineFigures | None


class _Sample(msgspec.Struct):
    t: float
    responses: dict[str, float]
    requests: float
    successes: float
    generated: float
    prompt: float
    ttft: list[int]
    itl: list[int]
    steps: int = 0
    admitted: int = 0
    hits: int = 0


_history: deque[_Sample] = deque()


def summary(cfg: FrontendConfig, stats: SchedulerStats | None, in_flight: int) -> Dashboard:
    snap = metrics.all_workers()
    h = snap.histograms
    now = _Sample(
        time.monotonic(),
        snap.responses,
        snap.counters.get("tgi_request_count", 0.0),
        snap.counters.get("tgi_request_success", 0.0),
        h["tgi_request_generated_tokens"][1],
        h["tgi_request_input_length"][1],
        h["tgi_mp_time_to_first_token_seconds"][0],
        h["tgi_mp_inter_token_latency_seconds"][0],
        *((stats.steps, stats.admitted_tokens, stats.cache_hit_tokens) if stats else ()),
    )
    base = _window_base(now)
    dt = now.t - base.t if base is not None else 0.0

    def rate(x: float, x0: float) -> float | None:
        return (x - x0) / dt if dt > 0 else None

    def latency(key: str) -> Percentiles:
        counts = getattr(now, key)
        if base is not None:
            counts = [a - b for a, b in zip(counts, getattr(base, key), strict=True)]
        return Percentiles(*(quantile(DURATION_BUCKETS, counts, q) for q in (0.5, 0.9, 0.99)))

    old = base.responses if base is not None else {}
    errors = [
        RouteErrors(route, int(status), n, n - old.get(key, 0.0) if base else n)
        for key, n in sorted(snap.responses.items())
        for route, status in [key.rsplit(" ", 1)]
        if int(status) >= 400
    ]
    return Dashboard(
        time=time.time(),
        window_s=round(dt, 3),
        info=_info(cfg),
        requests_total=now.requests,
        successes_total=now.successes,
        generated_tokens_total=now.generated,
        in_flight=in_flight,
        request_rate=rate(now.requests, base.requests) if base else None,
        success_rate=rate(now.successes, base.successes) if base else None,
        output_tokens_per_s=rate(now.generated, base.generated) if base else None,
        input_tokens_per_s=rate(now.prompt, base.prompt) if base else None,
        ttft_s=latency("ttft"),
        itl_s=latency("itl"),
        errors=errors,
        engine=_engine(stats, now, base, dt) if stats is not None else None,
    )


def _window_base(now: _Sample) -> _Sample | None:
    """The newest sample at least WINDOW_S old (else the oldest, if any), after
    recording `now`."""
    while _history and now.t - _history[0].t > _KEEP_S:
        _history.popleft()
    base = None
    for s in _history:
        if now.t - s.t >= WINDOW_S or base is None:
            base = s
        else:
            break
    _history.append(now)
    return base if base is not None and now.t - base.t >= _MIN_S else None


def _engine(stats: SchedulerStats, now: _Sample, base: _Sample | None, dt: float) -> EngineFigures:
    admitted = now.admitted - (base.admitted if base else 0)
    hits = now.hits - (base.hits if base else 0)
    return EngineFigures(
        queue_size=stats.waiting,
        running=stats.running,
        kv_blocks_used=stats.blocks_total - stats.blocks_free,
        kv_blocks_cached=stats.cached_blocks,
        kv_blocks_free=stats.blocks_free,
        kv_blocks_total=stats.blocks_total,
        preemptions=stats.preemptions,
        prefix_cache_hit_rate=hits / admitted if admitted > 0 else None,
        steps_per_s=(now.steps - base.steps) / dt if base is not None and dt > 0 else None,
    )


def _info(cfg: FrontendConfig) -> ServerInfo:
    return ServerInfo(
        model_id=cfg.model_id,
        served_model_name=cfg.served_model_name or cfg.model_id,
        version=cfg.version,
        dtype=cfg.dtype,
        attention_backend=cfg.attention_backend,
        num_shards=cfg.num_shards,
        lora_adapters=list(cfg.lora_adapters),
        max_concurrent_requests=cfg.max_concurrent_requests,
        max_input_tokens=cfg.max_input_tokens,
        max_total_tokens=cfg.max_total_tokens,
        max_batch_total_tokens=cfg.max_batch_total_tokens,
        block_size=cfg.block_size,
    )


def quantile(bounds: list[float], counts: list[int], q: float) -> float | None:
    """Prometheus' `histogram_quantile`: the bucket holding rank q·n, interpolated
    linearly inside it (the first bucket from 0). Observations beyond the last bound
    are not in `counts`; None when there are none."""
    n = sum(counts)
    if n <= 0:
        return None
    rank, seen = q * n, 0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            lo = bounds[i - 1] if i else 0.0
            return lo + (bounds[i] - lo) * (rank - seen) / c
        seen += c
    return bounds[-1]


@functools.cache
def page() -> bytes:
    return resources.files("tgi_mp.frontend").joinpath("dashboard.html").read_bytes()
