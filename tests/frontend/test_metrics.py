"""`/metrics` after a known workload, read with Prometheus' own parser: TGI's names
(counters without `_total`), labels and buckets, summed over two HTTP workers; and the
live dashboard built on the same figures, in a real browser."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.engine.oracle import tokenizer
from tests.frontend.server import Server

N = 12


@pytest.fixture(scope="module")
def server():
    with Server("--max-batch-total-tokens", "8192", "--frontend-workers", "2") as s:
        yield s


def scrape(server: Server) -> dict[str, dict[tuple, float]]:
    """name -> {sorted label items: value}. The parser calls a counter's sample
    `<name>_total` whatever the text says: counters are keyed by their family name."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = family.name if family.type == "counter" else s.name
            out.setdefault(name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_counts_histograms_and_gauges_after_a_known_workload(server) -> None:
    body = {"inputs": "The lighthouse", "parameters": {"max_new_tokens": 5}}

    async def workload() -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            ok = [http.post(server.url + "/generate", json=body) for _ in range(N - 2)]
            ok += [http.post(server.url + "/generate_stream", json=body) for _ in range(2)]
            bad = [
                http.post(
                    server.url + "/generate", json={"inputs": "x", "parameters": {"top_k": 0}}
                )
                for _ in range(3)
            ]
            answers = await asyncio.gather(*ok, *bad)
            assert [r.status_code for r in answers] == [200] * N + [422] * 3

    asyncio.run(workload())
    m = scrape(server)
    text = httpx.get(server.url + "/metrics").text
    assert "# TYPE tgi_request_success counter" in text and "tgi_request_success_total" not in text
    assert m["tgi_request_success"][()] == N
    assert m["tgi_request_count"][()] == N + 3
    assert m["tgi_request_failure"][(("err", "validation"),)] == 3
    # Histograms: one observation per success, TGI's buckets.
    assert m["tgi_request_duration_count"][()] == N
    assert m["tgi_request_generated_tokens_count"][()] == N
    assert m["tgi_request_generated_tokens_sum"][()] == 5 * N
    assert m["tgi_request_max_new_tokens_sum"][()] == 5 * N
    prompt_len = len(tokenizer()("The lighthouse")["input_ids"])
    assert m["tgi_request_input_length_sum"][()] == prompt_len * N
    les = [dict(k)["le"] for k in m["tgi_request_duration_bucket"]]
    assert les[0] == "0.00015" and les[-1] == "+Inf" and len(les) == 36
    assert m["tgi_request_duration_bucket"][(("le", "+Inf"),)] == N
    for name in ("validation", "queue", "inference", "mean_time_per_token"):
        assert m[f"tgi_request_{name}_duration_count"][()] == N
    # Engine gauges: idle again, capacity as configured; the steps were counted.
    assert m["tgi_queue_size"][()] == 0 and m["tgi_batch_current_size"][()] == 0
    assert m["tgi_batch_max_total_tokens"][()] == 8192
    assert m["tgi_mp_kv_blocks_free"][()] == m["tgi_mp_kv_blocks_total"][()]
    prefill = m["tgi_batch_inference_count"][(("method", "prefill"),)]
    decode = m["tgi_batch_inference_count"][(("method", "decode"),)]
    assert prefill >= 1 and decode >= 4
    assert m["tgi_batch_forward_duration_count"][(("method", "decode"),)] == decode
    assert m["tgi_batch_inference_duration_count"][(("method", "prefill"),)] == prefill
    assert m["tgi_batch_inference_duration_count"][(("method", "decode"),)] == decode
    # Every admitted request was admitted by some step (prefix-cache deferrals included).
    assert m["tgi_batch_next_size_sum"][()] >= N and m["tgi_batch_next_size_count"][()] >= 1
    assert m["tgi_batch_inference_duration_sum"][(("method", "decode"),)] > 0
    assert m["tgi_mp_prefix_cache_hit_tokens"][()] >= 0
    # Speculative decoding is off by default: its counters are there, at zero.
    assert m["tgi_mp_spec_proposed_tokens"][()] == m["tgi_mp_spec_accepted_tokens"][()] == 0
    assert m["tgi_mp_spec_acceptance_rate"][()] == 0
    # The executor's gaps between steps: one observation per step, finer buckets.
    steps = prefill + decode
    for name in ("idle", "plan_decode", "result_send"):
        assert m[f"tgi_mp_executor_{name}_seconds_count"][()] == steps
        assert m[f"tgi_mp_executor_{name}_seconds_sum"][()] > 0
    les = [dict(k)["le"] for k in m["tgi_mp_executor_idle_seconds_bucket"]]
    assert les[0] == "1e-05" and les[-1] == "+Inf"
    # vLLM's latency histograms: a first token per request, then 4 gaps of 5 tokens.
    assert m["tgi_mp_time_to_first_token_seconds_count"][()] == N
    assert m["tgi_mp_inter_token_latency_seconds_count"][()] == 4 * N
    # Responses by route and status (routes as labels: a bounded set), counted as
    # each answer ends: a scrape may come a moment before the last one is.
    want = {"/generate 200": N - 2, "/generate 422": 3, "/generate_stream 200": 2}
    for _ in range(20):
        got = {
            dict(k)["route"] + " " + dict(k)["status"]: v
            for k, v in scrape(server)["tgi_mp_http_responses"].items()
        }
        if all(got.get(k) == v for k, v in want.items()):
            break
        time.sleep(0.1)
    assert {k: got.get(k) for k in want} == want


def test_both_workers_answered_and_scrapes_agree(server) -> None:
    # Every scrape, whichever worker answers it, shows the same totals.
    totals = {scrape(server)["tgi_request_count"][()] for _ in range(6)}
    assert len(totals) == 1


CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")  # Debian's; .ci/run installs it
# As root in a sandboxed VM with no network: no sandbox, no background connections.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", "test-artifacts"))


def traffic(server: Server, stop: threading.Event) -> None:
    """Requests one after another until `stop`, so every dashboard window has some."""
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 16}}
    with httpx.Client(timeout=120) as http:
        while not stop.is_set():
            assert http.post(server.url + "/generate", json=body).status_code == 200


def test_dashboard_data_over_both_workers(server) -> None:
    stop = threading.Event()
    worker = threading.Thread(target=traffic, args=(server, stop))
    worker.start()
    try:
        polls = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(polls) < 3:
            d = httpx.get(server.url + "/dashboard/data", timeout=30).json()
            if d["window_s"] > 0 and d["output_tokens_per_s"]:
                polls.append(d)
            time.sleep(0.7)
    finally:
        stop.set()
        worker.join()
    assert len(polls) == 3, "no poll saw tokens in its window"
    info = httpx.get(server.url + "/info").json()
    for d in polls:
        assert d["info"]["model_id"] == info["model_id"]
        assert d["info"]["dtype"] == info["dtype"] and d["info"]["num_shards"] == 1
        assert d["request_rate"] > 0 and d["ttft_s"]["p50"] > 0 and d["itl_s"]["p50"] > 0
        assert d["ttft_s"]["p50"] <= d["ttft_s"]["p90"] <= d["ttft_s"]["p99"]
        assert (
            d["engine"]["kv_blocks_total"]
            == d["engine"]["kv_blocks_used"] + d["engine"]["kv_blocks_free"]
        )
        assert {"route": "/generate", "status": 422} in [
            {"route": e["route"], "status": e["status"]} for e in d["errors"]
        ]
    # Totals are every worker's: they only grow, whichever worker answered.
    totals = [d["generated_tokens_total"] for d in polls]
    assert totals == sorted(totals) and totals[-1] > 5 * N


def test_dashboard_in_a_real_browser(server) -> None:
    from playwright.sync_api import sync_playwright

    bad = {"inputs": "x", "parameters": {"top_k": 0}}
    assert httpx.post(server.url + "/generate", json=bad).status_code == 422
    stop = threading.Event()
    worker = threading.Thread(target=traffic, args=(server, stop))
    worker.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.goto(server.url + "/dashboard")
                page.wait_for_function(
                    "Number(document.getElementById('output-tps').textContent) > 0",
                    timeout=60_000,
                )
                page.wait_for_function(
                    "document.querySelectorAll('#chart-output polyline')[0]"
                    ".getAttribute('points').split(' ').length >= 2",
                    timeout=30_000,
                )
                model = page.text_content("#model")
                tps = float(page.text_content("#output-tps"))
                kv_total = page.text_content("#kv-total")
                ttft = page.text_content("#ttft-p50")
                errors = page.text_content("#errors")
                status = page.text_content("#status")
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            finally:
                browser.close()
    finally:
        stop.set()
        worker.join()
    info = httpx.get(server.url + "/info").json()
    assert model == info["model_id"] and tps > 0
    assert int(kv_total) > 0 and ttft.endswith((" ms", " s"))
    assert "/generate" in errors and "422" in errors
    assert status.startswith("updated")
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
