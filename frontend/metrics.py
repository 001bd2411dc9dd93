"""`/metrics`: request counters and durations with TGI's names, plus engine gauges.

The scheduler's figures (KV blocks, queue, batch) are fetched at scrape time
over IPC, so one scrape shows the engine as it is now. The full TGI metric
set, and aggregation across several HTTP workers, come with the operations work.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tgi_mp.ipc.messages import SchedulerStats

CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()
disable_created_metrics()

registry = CollectorRegistry()
_count = Counter("tgi_request_count", "Requests received", registry=registry)
_success = Counter("tgi_request_success", "Requests that succeeded", registry=registry)
_failure = Counter("tgi_request_failure", "Requests that failed", ["err"], registry=registry)
_duration = Histogram(
    "tgi_request_duration",
    "Request duration (s)",
    registry=registry,
    buckets=[0.001 * 1.5**i for i in range(35)],
)
_input_length = Histogram(
    "tgi_request_input_length",
    "Prompt tokens",
    registry=registry,
    buckets=[2.0**i for i in range(1, 18)],
)
_generated = Histogram(
    "tgi_request_generated_tokens",
    "Generated tokens",
    registry=registry,
    buckets=[2.0**i for i in range(1, 18)],
)
_queue = Gauge("tgi_queue_size", "Requests waiting in the scheduler", registry=registry)
_batch = Gauge("tgi_batch_current_size", "Requests running in the scheduler", registry=registry)
_blocks_free = Gauge("tgi_mp_kv_blocks_free", "Free KV cache blocks", registry=registry)
_blocks_total = Gauge("tgi_mp_kv_blocks_total", "KV cache blocks", registry=registry)
_in_flight = Gauge(
    "tgi_mp_http_in_flight", "Generation requests this HTTP worker is serving", registry=registry
)
_preemptions = Gauge("tgi_mp_preemptions", "Requests preempted since start", registry=registry)
_admitted = Gauge(
    "tgi_mp_prefix_cache_admitted_tokens",
    "Tokens of requests admitted since start (again after a preemption)",
    registry=registry,
)
_hits = Gauge(
    "tgi_mp_prefix_cache_hit_tokens",
    "Admitted tokens served from the prefix cache since start",
    registry=registry,
)
_hit_rate = Gauge(
    "tgi_mp_prefix_cache_hit_rate", "hit tokens / admitted tokens since start", registry=registry
)
_cached_blocks = Gauge(
    "tgi_mp_prefix_cache_blocks", "KV blocks holding a cached prefix", registry=registry
)


def success(duration: float, input_tokens: int, generated: int) -> None:
    _count.inc()
    _success.inc()
    _duration.observe(duration)
    _input_length.observe(input_tokens)
    _generated.observe(generated)


def failure(err: str) -> None:
    _count.inc()
    _failure.labels(err).inc()


def render(stats: SchedulerStats | None, in_flight: int) -> bytes:
    _in_flight.set(in_flight)
    if stats is not None:
        _queue.set(stats.waiting)
        _batch.set(stats.running)
        _blocks_free.set(stats.blocks_free)
        _blocks_total.set(stats.blocks_total)
        _preemptions.set(stats.preemptions)
        _admitted.set(stats.admitted_tokens)
        _hits.set(stats.cache_hit_tokens)
        _hit_rate.set(stats.cache_hit_tokens / max(stats.admitted_tokens, 1))
        _cached_blocks.set(stats.cached_blocks)
    return generate_latest(registry)
