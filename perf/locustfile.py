"""Load test for locust: users calling /generate and /generate_stream.

Locust times a streamed request until its headers arrive; use
`perf/bench_serving.py` for time-to-first-token and inter-token latency.

    locust -f perf/locustfile.py --host http://127.0.0.1:3000 --headless \
        -u 16 -r 4 --run-time 60s --csv perf/out/locust --html perf/out/locust.html
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
