"""OpenTelemetry spans per request, exported over OTLP/HTTP (`--otlp-endpoint`).

Optional: it needs `pip install 'tgi-mp[otlp]'`. Each finished request gives a
span named after its route, child of the caller's W3C `traceparent` when one
came in, with three children as TGI reports them: `validation` (parsing,
tokenization, checks), `queue` (until the first token) and `inference` (first
token to the end). Spans are built when the request ends, from the times it
recorded, so the hot path carries no tracing objects.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("tgi_mp.frontend")

_tracer: Any = None
_propagator: Any = None


def setup(endpoint: str, service_name: str) -> None:
    """Starts exporting to `endpoint` (an OTLP/HTTP collector, e.g. http://host:4318)."""
    global _tracer, _propagator
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    url = endpoint.rstrip("/")
    if not url.endswith("/v1/traces"):
        url += "/v1/traces"
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    _tracer = provider.get_tracer("tgi_mp")
    _propagator = TraceContextTextMapPropagator()
    log.info("exporting OpenTelemetry spans to %s as %r", url, service_name)


def enabled() -> bool:
    return _tracer is not None


def record(
    name: str,
    traceparent: str | None,
    t0: float,
    t_valid: float,
    t_first: float,
    t_end: float,
    attributes: dict[str, Any],
) -> None:
    """One request's spans; times are `time.perf_counter()` readings."""
    if _tracer is None:
        return
    offset = time.time_ns() - time.perf_counter_ns()

    def ns(t: float) -> int:
        return int(t * 1e9) + offset

    parent = _propagator.extract({"traceparent": traceparent}) if traceparent else None
    from opentelemetry import trace

    root = _tracer.start_span(name, context=parent, start_time=ns(t0), attributes=attributes)
    ctx = trace.set_span_in_context(root)
    for child, start, end in (
        ("validation", t0, t_valid),
        ("queue", t_valid, t_first),
        ("inference", t_first, t_end),
    ):
        _tracer.start_span(child, context=ctx, start_time=ns(start)).end(end_time=ns(end))
    root.end(end_time=ns(t_end))
