"""The dashboard's summary: percentiles from histogram buckets, rates over a window of
recent polls, errors by route."""

from __future__ import annotations

import pytest

from tgi_mp.frontend import dashboard, metrics
from tgi_mp.frontend.config import FrontendConfig
from tgi_mp.frontend.dashboard import quantile
from tgi_mp.ipc.messages import SchedulerStats

CFG = FrontendConfig(
    ipc_root="/nonexistent",
    tokenizer_dir="/nonexistent",
    model_id="org/model",
    max_input_tokens=100,
    max_total_tokens=200,
    num_shards=2,
    dtype="bfloat16",
)


def stats(steps: int, admitted: int, hits: int) -> SchedulerStats:
    return SchedulerStats(
        steps=steps,
        preemptions=1,
        prefill_tokens=0,
        decode_tokens=0,
        waiting=3,
        running=5,
        blocks_free=60,
        blocks_total=100,
        schedule_time=0.0,
        step_time=0.0,
        forward_time=0.0,
        busy_time=0.0,
        admitted_tokens=admitted,
        cache_hit_tokens=hits,
        cached_blocks=12,
    )


def test_quantile_interpolates_inside_the_bucket() -> None:
    bounds = [1.0, 2.0, 4.0]
    assert quantile(bounds, [0, 0, 0], 0.5) is None
    assert quantile(bounds, [0, 10, 0], 0.5) == pytest.approx(1.5)
    assert quantile(bounds, [10, 0, 0], 0.5) == pytest.approx(0.5)  # from 0
    assert quantile(bounds, [5, 0, 5], 0.9) == pytest.approx(2.0 + 2.0 * 4 / 5)
    assert quantile(bounds, [1, 1, 0], 1.0) == pytest.approx(2.0)


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(dashboard.time, "monotonic", lambda: now[0])
    dashboard._history.clear()
    metrics.configure(None, 100, 200)
    yield now
    dashboard._history.clear()
    metrics.configure(None, 100, 200)


def test_rates_and_percentiles_over_the_window(clock) -> None:
    first = dashboard.summary(CFG, stats(10, 0, 0), in_flight=0)
    # Nothing to difference yet: no rates, percentiles since start (none).
    assert first.window_s == 0 and first.output_tokens_per_s is None
    assert first.ttft_s.p50 is None and first.info.num_shards == 2
    assert first.info.served_model_name == "org/model" and first.info.dtype == "bfloat16"

    for _ in range(4):  # 4 requests of 10 tokens, first token after ~0.2 s
        metrics.success(1.0, 0.05, 0.15, 7, 10, 10)
        for _ in range(9):
            metrics.token_gap(0.02)
        metrics.response("/generate", 200)
    metrics.failure("validation")
    metrics.response("/generate", 422)
    clock[0] += 5.0
    d = dashboard.summary(CFG, stats(60, 100, 25), in_flight=2)
    assert d.window_s == 5.0
    assert d.output_tokens_per_s == pytest.approx(40 / 5)
    assert d.input_tokens_per_s == pytest.approx(28 / 5)
    assert d.request_rate == pytest.approx(5 / 5) and d.success_rate == pytest.approx(4 / 5)
    assert 0.1 < d.ttft_s.p50 <= 0.3 and 0.01 < d.itl_s.p99 <= 0.03
    assert d.requests_total == 5 and d.successes_total == 4 and d.generated_tokens_total == 40
    assert [(e.route, e.status, e.total, e.in_window) for e in d.errors] == [
        ("/generate", 422, 1, 1)
    ]
    e = d.engine
    assert (e.queue_size, e.running, e.kv_blocks_used, e.kv_blocks_free) == (3, 5, 40, 60)
    assert e.kv_blocks_cached == 12 and e.prefix_cache_hit_rate == pytest.approx(0.25)
    assert e.steps_per_s == pytest.approx(50 / 5)

    # 15 s on, nothing new: the window starts at the poll 10+ s old, which saw it all.
    clock[0] += 15.0
    quiet = dashboard.summary(CFG, stats(60, 100, 25), in_flight=0)
    assert quiet.window_s == 15.0 and quiet.output_tokens_per_s == 0
    assert quiet.ttft_s.p50 is None  # no first token in the window
    assert quiet.errors[0].in_window == 0 and quiet.errors[0].total == 1
    assert quiet.engine.prefix_cache_hit_rate is None


def test_polls_too_close_together_give_no_rates(clock) -> None:
    dashboard.summary(CFG, None, 0)
    clock[0] += 0.1
    d = dashboard.summary(CFG, None, 0)
    assert d.window_s == 0 and d.request_rate is None and d.engine is None
