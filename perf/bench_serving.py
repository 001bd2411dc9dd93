"""Bounded streaming load over HTTP against tgi-mp: throughput, TTFT and ITL.

    python perf/bench_serving.py                       # starts its own server (bundled model)
    python perf/bench_serving.py --url http://127.0.0.1:3000 --concurrency 1,8
    python perf/bench_serving.py --api tgi,chat        # both APIs, level by level

Each level sends `--requests` streaming requests (prose prompts of
~`--prompt-words` words, `--new-tokens` new tokens, greedy) with at most
`concurrency` in flight, and reports output tokens/s, time to first token and
inter-token latency percentiles, as a client sees them. `--api tgi` drives
`/generate_stream`; `--api chat` drives `/v1/chat/completions` (the prompt as
one user message, so the chat template adds a few tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.engine.oracle import TEXT
from tests.frontend.server import Server


def request(api: str, prompt: str, new_tokens: int) -> tuple[str, dict]:
    if api == "chat":
        return "/v1/chat/completions", {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": new_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    return "/generate_stream", {"inputs": prompt, "parameters": {"max_new_tokens": new_tokens}}


def is_token(api: str, event: dict) -> bool:
    """Whether an SSE event carries a generated token (chat: a content delta)."""
    if api == "chat":
        return bool(event["choices"]) and bool(event["choices"][0]["delta"].get("content"))
    return True


async def run_level(
    url: str, prompts: list[str], concurrency: int, new_tokens: int, api: str = "tgi"
) -> dict:
    sem = asyncio.Semaphore(concurrency)
    ttft: list[float] = []
    itl: list[float] = []
    tokens = 0
    errors = 0

    async def one(http: httpx.AsyncClient, prompt: str) -> None:
        nonlocal tokens, errors
        path, body = request(api, prompt, new_tokens)
        async with sem:
            t = time.perf_counter()
            first = True
            async with http.stream("POST", url + path, json=body) as resp:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        errors += 1
                        return
                    if not is_token(api, event):
                        continue
                    now = time.perf_counter()
                    (ttft if first else itl).append(now - t)
                    t, first = now, False
                    tokens += 1

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(http, p) for p in prompts))
        wall = time.perf_counter() - t0
    ms = lambda xs, q: float(np.percentile(xs, q)) * 1000 if xs else float("nan")  # noqa: E731
    return {
        "tok_s": tokens / wall,
        "tokens": tokens,
        "wall": wall,
        "errors": errors,
        "ttft": (ms(ttft, 50), ms(ttft, 99)),
        "itl": (ms(itl, 50), ms(itl, 99)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", default=None, help="a running server; default: start one")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--requests", type=int, default=0, help="per level; default 2 x concurrency")
    ap.add_argument("--prompt-words", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--api", default="tgi", help="tgi, chat, or both: tgi,chat")
    args = ap.parse_args()

    words = (TEXT * 3).split()
    levels = [int(c) for c in args.concurrency.split(",")]
    server = None
    url = args.url
    if url is None:
        server = Server("--max-batch-total-tokens", "32768", "--max-concurrent-requests", "256")
        url = server.url
    try:
        print(
            f"server: {url}; {args.prompt_words}-word prompts, {args.new_tokens} new tokens, "
            "greedy, streaming\n"
        )
        print(
            "| API | concurrency | requests | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |"
        )
        print("|---|---|---|---|---|---|")
        for c in levels:
            n = args.requests or 2 * c
            prompts = [
                " ".join(words[(i * 13) % 300 : (i * 13) % 300 + args.prompt_words])
                for i in range(n)
            ]
            for api in args.api.split(","):
                r = asyncio.run(run_level(url, prompts, c, args.new_tokens, api))
                err = f" ({r['errors']} errors)" if r["errors"] else ""
                print(
                    f"| {api} | {c} | {n}{err} | {r['tok_s']:.1f} "
                    f"| {r['ttft'][0]:.0f} / {r['ttft'][1]:.0f} "
                    f"| {r['itl'][0]:.0f} / {r['itl'][1]:.0f} |",
                    flush=True,
                )
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
