"""OpenTelemetry: a request's spans reach an OTLP/HTTP collector (one in this test
process), under the trace id of the caller's `traceparent`."""

from __future__ import annotations

import http.server
import os
import threading
import time

import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.frontend.server import Server

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Collector(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        self.spans: list = []
        self.resources: list = []
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                req = ExportTraceServiceRequest.FromString(body)
                for rs in req.resource_spans:
                    collector.resources.append(rs.resource)
                    for ss in rs.scope_spans:
                        collector.spans.extend(ss.spans)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_spans_carry_the_incoming_trace_id() -> None:
    collector = Collector()
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # export within 0.1 s (the server inherits it)
    try:
        with Server(
            "--max-batch-total-tokens", "4096",
            "--otlp-endpoint", endpoint, "--otlp-service-name", "tgi-mp-test",
        ) as server:  # fmt: skip
            body = {"inputs": "Lighthouses", "parameters": {"max_new_tokens": 3}}
            headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
            assert (
                httpx.post(server.url + "/generate", json=body, headers=headers).status_code == 200
            )
            chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
            assert httpx.post(server.url + "/v1/chat/completions", json=chat).status_code == 200
            deadline = time.monotonic() + 20
            while len(collector.spans) < 8 and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        os.environ.pop("OTEL_BSP_SCHEDULE_DELAY", None)
        collector.shutdown()
    by_name: dict[str, list] = {}
    for span in collector.spans:
        by_name.setdefault(span.name, []).append(span)
    (generate,) = by_name["/generate"]
    assert generate.trace_id.hex() == TRACE_ID and generate.parent_span_id.hex() == PARENT_ID
    for child in ("validation", "queue", "inference"):
        mine = [s for s in by_name[child] if s.trace_id == generate.trace_id]
        assert len(mine) == 1 and mine[0].parent_span_id == generate.span_id
        assert generate.start_time_unix_nano <= mine[0].start_time_unix_nano
        assert mine[0].end_time_unix_nano <= generate.end_time_unix_nano
    (chat_span,) = by_name["/v1/chat/completions"]
    assert chat_span.trace_id.hex() != TRACE_ID  # no traceparent: a new trace
    names = {a.value.string_value for r in collector.resources for a in r.attributes}
    assert "tgi-mp-test" in names
