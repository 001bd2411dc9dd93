"""`/metrics` exposition, and the Grafana dashboard that queries it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tgi_mp.frontend.metrics import Metrics
from tgi_mp.ipc.messages import DURATION_BUCKETS, SchedulerStats

DASHBOARD = Path(__file__).resolve().parents[2] / "perf" / "grafana" / "tgi-mp.json"


def exposition() -> str:
    stats = SchedulerStats(
        steps=1, preemptions=0, prefill_tokens=1, decode_tokens=1, waiting=0, running=0,
        blocks_free=1, blocks_total=1, schedule_time=0.0, step_time=0.0, forward_time=0.0,
        busy_time=0.0, forward_buckets=[[0] * len(DURATION_BUCKETS)] * 2,
        step_buckets=[[0] * len(DURATION_BUCKETS)] * 2,
    )  # fmt: skip
    m = Metrics()
    m.failure("validation")
    return m.render(stats, 0, 16).decode()


def exported_names() -> set[str]:
    lines = exposition().splitlines()
    return {line.split("{")[0].split(" ")[0] for line in lines if line[:1] != "#"}


def test_each_family_is_declared_once() -> None:
    # Prometheus refuses a scrape that declares a family twice.
    declared = [line.split()[2] for line in exposition().splitlines() if line.startswith("# TYPE")]
    assert len(declared) == len(set(declared)) > 20


def test_every_query_names_an_exported_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    names = exported_names()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    functions = {"histogram_quantile", "sum", "rate", "by", "le", "method", "err"}
    for expr in exprs:
        used = set(re.findall(r"\b(tgi_\w+)", expr))
        assert used, expr
        assert used <= names, (expr, used - names)
        assert set(re.findall(r"\b([a-z_]+)\s*\(", expr)) <= functions, expr
