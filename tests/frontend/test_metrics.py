"""`/metrics` after a known workload, read with Prometheus' own parser: TGI's names
(counters without `_total`), labels and buckets, summed over two HTTP workers."""

from __future__ import annotations

import asyncio

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


def test_both_workers_answered_and_scrapes_agree(server) -> None:
    # Every scrape, whichever worker answers it, shows the same totals.
    totals = {scrape(server)["tgi_request_count"][()] for _ in range(6)}
    assert len(totals) == 1
