"""`tgi-mp serve`'s lifecycle: a SIGTERM drains in-flight streams, a dead child takes
the server down loudly, and nothing is left behind."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from tests.engine.oracle import TEXT
from tests.frontend.server import Server, runtime_of, tgi_mp_shm


def test_sigterm_lets_in_flight_streams_finish_and_refuses_new_ones() -> None:
    server = Server("--max-batch-total-tokens", "8192", "--graceful-termination-timeout", "60")
    body = {"inputs": "The lighthouse keeper", "parameters": {"max_new_tokens": 40}}
    try:

        async def main() -> tuple[list[dict], bool]:
            started = asyncio.Semaphore(0)

            async def stream(http: httpx.AsyncClient) -> dict:
                last: dict = {}
                async with http.stream("POST", server.url + "/generate_stream", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            if not last:
                                started.release()
                            last = json.loads(line[5:])
                return last

            async with httpx.AsyncClient(timeout=120) as http:
                tasks = [asyncio.create_task(stream(http)) for _ in range(8)]
                for _ in range(8):
                    await asyncio.wait_for(started.acquire(), 60)
                server.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(1.0)
                try:  # a new connection after SIGTERM is refused (or answered 503)
                    r = await http.post(server.url + "/generate", json=body, timeout=5)
                    refused = r.status_code == 503
                except httpx.HTTPError:
                    refused = True
                return await asyncio.gather(*tasks), refused

        finals, refused = asyncio.run(main())
        assert all(f.get("generated_text") is not None for f in finals), finals
        assert all(f["details"] is None and f["index"] == 40 for f in finals)
        assert refused
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def test_at_the_end_of_the_grace_period_every_request_is_told(tmp_path) -> None:
    """Requests still running when --graceful-termination-timeout ends get an answer that
    says why: a final error event in streams (OpenAI's, then [DONE], on /v1), a 503 for
    the others. The exit is clean (0) and the log counts what was cut."""
    log = tmp_path / "serve.log"
    server = Server(
        "--max-batch-total-tokens", "8192", "--graceful-termination-timeout", "3", log=log
    )  # fmt: skip
    prose = TEXT[:600]  # greedy continuations of prose run long before an EOS
    tgi = {"inputs": prose, "parameters": {"max_new_tokens": 3000}}
    completion = {"prompt": prose, "max_tokens": 3000, "temperature": 0, "stream": True}
    try:

        async def main() -> tuple[list[list[bytes]], list[httpx.Response]]:
            started = asyncio.Semaphore(0)

            async def stream(http: httpx.AsyncClient, path: str, body: dict) -> list[bytes]:
                events = []
                async with http.stream("POST", server.url + path, json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            if not events:
                                started.release()
                            events.append(line[len("data:") :].strip().encode())
                return events

            async with httpx.AsyncClient(timeout=120) as http:
                streams = [
                    asyncio.create_task(stream(http, "/generate_stream", tgi)),
                    asyncio.create_task(stream(http, "/v1/completions", completion)),
                ]
                plain = [
                    asyncio.create_task(http.post(server.url + "/generate", json=tgi)),
                    asyncio.create_task(
                        http.post(
                            server.url + "/v1/completions", json={**completion, "stream": False}
                        )
                    ),
                ]
                for _ in streams:
                    await asyncio.wait_for(started.acquire(), 60)
                await asyncio.sleep(1.0)  # the two others are admitted by now
                server.proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*streams), await asyncio.gather(*plain)

        (tgi_events, openai_events), (generate, completed) = asyncio.run(main())
        assert json.loads(tgi_events[-1]) == {
            "error": "The server is shutting down",
            "error_type": "shutting_down",
        }
        assert all("error" not in json.loads(e) for e in tgi_events[:-1])
        assert openai_events[-1] == b"[DONE]"
        err = json.loads(openai_events[-2])["error"]
        assert err["message"] == "The server is shutting down" and err["code"] == "shutting_down"
        assert generate.status_code == 503 and generate.json()["error_type"] == "shutting_down"
        assert completed.status_code == 503
        assert completed.json()["error"]["type"] == "service_unavailable"
        assert server.proc.wait(30) == 0  # a requested shutdown is a clean one
        text = log.read_text()
        assert re.search(r"grace period of 3 s over: cutting 4 requests still in flight", text)
    finally:
        server.stop()


@pytest.mark.parametrize("victim", ["every child"])
def test_a_killed_child_takes_the_server_down(victim: str) -> None:
    """kill -9 of all of the server's children at once (of one, the executor or the
    scheduler, in test_engine_crash.py): the server exits loudly and leaves no process,
    shared memory or runtime file behind."""
    shm_before = set(tgi_mp_shm())
    server = Server("--max-batch-total-tokens", "8192")
    try:
        family = psutil.Process(server.proc.pid).children(recursive=True)
        runtime, ring_users = runtime_of(family)
        assert os.path.isdir(runtime)
        # The plan ring is mapped by the scheduler and the executor, and named nowhere.
        assert sorted(u.split()[2] for u in ring_users) == [
            "tgi_mp.executor.main",
            "tgi_mp.scheduler.main",
        ]
        if victim == "every child":
            victims = family
        else:
            victims = [p for p in family if victim in " ".join(p.cmdline())]
            assert len(victims) == 1
        killed_at = time.monotonic()
        for child in victims:
            child.send_signal(signal.SIGKILL)
        code = server.proc.wait(10)
        assert code != 0 and time.monotonic() - killed_at < 10
        deadline = time.monotonic() + 10
        while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family):
            assert time.monotonic() < deadline, [p.pid for p in family if p.is_running()]
            time.sleep(0.1)
        assert set(tgi_mp_shm()) == shm_before  # tgi-mp names none; nothing appeared
        assert not os.path.exists(runtime), "the runtime directory went with the server"
    finally:
        server.stop()


def test_locust_load_test_runs_without_failures(tmp_path) -> None:
    """The README's locust command, bounded to 8 s and 4 users."""
    with Server("--max-batch-total-tokens", "8192") as server:
        r = subprocess.run(
            [
                sys.executable, "-m", "locust", "-f", "perf/locustfile.py",
                "--host", server.url, "--headless", "-u", "4", "-r", "4",
                "--run-time", "8s", "--stop-timeout", "30",
                "--csv", str(tmp_path / "locust"), "--html", str(tmp_path / "locust.html"),
            ],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "locust_stats.csv").open()))
    total = next(row for row in rows if row["Name"] == "Aggregated")
    # Behaviour, not speed: requests were served and none failed (a busy machine serves few).
    assert int(total["Request Count"]) >= 1 and int(total["Failure Count"]) == 0, total
    # Users pick their tasks at random: which endpoints 8 s covers varies.
    endpoints = {row["Name"] for row in rows} - {"Aggregated"}
    assert endpoints and all(n.startswith(("/generate", "/v1/chat/completions")) for n in endpoints)
    assert (tmp_path / "locust.html").stat().st_size > 0
