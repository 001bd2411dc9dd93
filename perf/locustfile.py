"""Load test for locust: users calling /generate, /generate_stream and
/v1/chat/completions (streamed and not), against a running `tgi-mp serve`.

    mkdir -p perf/out && locust -f perf/locustfile.py --host http://127.0.0.1:3000 \
        --headless -u 16 -r 4 --run-time 60s --csv perf/out/locust --html perf/out/locust.html

A stream counts as a failure if it carries an error event or ends without its
final event. Locust times a streamed request until the stream is read to the
end; use `perf/bench_serving.py` for time to first token and inter-token latency.
"""

from __future__ import annotations

import json
import random

from locust import HttpUser, between, task

PROMPTS = [
    "The history of the lighthouse begins",
    "Write a short poem about the sea.",
    "Explain how a Fresnel lens works.",
    "List three facts about Robert Louis Stevenson.",
]


class TGIUser(HttpUser):
    wait_time = between(0.5, 2.0)

    def _body(self) -> dict:
        return {
            "inputs": random.choice(PROMPTS),
            "parameters": {"max_new_tokens": random.choice([16, 32, 64])},
        }

    @task(1)
    def generate(self) -> None:
        self.client.post("/generate", json=self._body(), name="/generate")

    @task(2)
    def generate_stream(self) -> None:
        with self.client.post(
            "/generate_stream",
            json=self._body(),
            stream=True,
            name="/generate_stream",
            catch_response=True,
        ) as resp:
            final = None
            for line in resp.iter_lines():
                if line.startswith(b"data:"):
                    event = json.loads(line[5:])
                    if "error" in event:
                        resp.failure(event["error"])
                        return
                    final = event.get("generated_text")
            if final is None:
                resp.failure("the stream ended without a final event")

    @task(1)
    def chat(self) -> None:
        body = {
            "model": "tgi-mp",
            "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
            "max_tokens": random.choice([16, 32]),
        }
        with self.client.post(
            "/v1/chat/completions", json=body, name="/v1/chat/completions", catch_response=True
        ) as resp:
            if resp.status_code != 200 or not resp.json()["choices"]:
                resp.failure(f"status {resp.status_code}: {resp.text[:200]}")

    @task(1)
    def chat_stream(self) -> None:
        body = {
            "model": "tgi-mp",
            "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
            "max_tokens": random.choice([16, 32]),
            "stream": True,
        }
        with self.client.post(
            "/v1/chat/completions",
            json=body,
            stream=True,
            name="/v1/chat/completions (stream)",
            catch_response=True,
        ) as resp:
            done = finished = False
            for line in resp.iter_lines():
                if line == b"data: [DONE]":
                    done = True
                elif line.startswith(b"data:"):
                    event = json.loads(line[5:])
                    if "error" in event:
                        resp.failure(event["error"]["message"])
                        return
                    finished |= any(c.get("finish_reason") for c in event["choices"])
            if not (done and finished):
                resp.failure("the stream ended without a finish_reason and [DONE]")
