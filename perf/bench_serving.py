"""Bounded streaming load over HTTP against tgi-mp: throughput, TTFT and ITL.

    python perf/bench_serving.py                       # starts its own server (bundled model)
    python perf/bench_serving.py --url http://127.0.0.1:3000 --concurrency 1,8
    python perf/bench_serving.py --api tgi,chat        # both APIs, level by level
    python perf/bench_serving.py --out perf/results/serving   # + serving.json and PNG plots

Each level sends `--requests` streaming requests (prose prompts of
~`--prompt-words` words, `--new-tokens` new tokens, greedy) with at most
`concurrency` in flight, and reports output tokens/s, time to first token and
inter-token latency percentiles, as a client sees them. `--api tgi` drives
`/generate_stream`; `--api chat` drives `/v1/chat/completions` (the prompt as
one user message, so the chat template adds a few tokens). With `--out`, the
results also go to `serving.json` there, plotted by `perf/plots.py` into
`throughput.png` and `latency.png`.
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

    def ms(xs: list[float]) -> dict[str, float]:
        return {
            f"p{q}": float(np.percentile(xs, q)) * 1000 if xs else float("nan")
            for q in (50, 90, 99)
        }

    return {
        "tok_s": tokens / wall,
        "tokens": tokens,
        "wall": wall,
        "errors": errors,
        "ttft_ms": ms(ttft),
        "itl_ms": ms(itl),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", default=None, help="a running server; default: start one")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--requests", type=int, default=0, help="per level; default 2 x concurrency")
    ap.add_argument("--prompt-words", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--api", default="tgi", help="tgi, chat, or both: tgi,chat")
    ap.add_argument("--out", type=Path, default=None, help="a folder for JSON and PNG plots")
    ap.add_argument("--server-args", default="", help="extra `tgi-mp serve` flags")
    args = ap.parse_args()

    words = (TEXT * 3).split()
    levels = [int(c) for c in args.concurrency.split(",")]
    server = None
    url = args.url
    if url is None:
        server = Server(
            "--max-batch-total-tokens",
            "32768",
            "--max-concurrent-requests",
            "256",
            *args.server_args.split(),
        )
        url = server.url
    title = f"{args.prompt_words}-word prompts, {args.new_tokens} new tokens, greedy, streaming" + (
        f" ({args.server_args})" if args.server_args else ""
    )
    runs = []
    try:
        print(f"server: {url}; {title}\n")
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
                runs.append({"api": api, "concurrency": c, "requests": n, **r})
                err = f" ({r['errors']} errors)" if r["errors"] else ""
                ttft, itl = r["ttft_ms"], r["itl_ms"]
                print(
                    f"| {api} | {c} | {n}{err} | {r['tok_s']:.1f} "
                    f"| {ttft['p50']:.0f} / {ttft['p99']:.0f} "
                    f"| {itl['p50']:.0f} / {itl['p99']:.0f} |",
                    flush=True,
                )
    finally:
        if server is not None:
            server.stop()
    if args.out is not None:
        from perf.plots import plot_serving

        args.out.mkdir(parents=True, exist_ok=True)
        results = {"title": title, "runs": runs}
        (args.out / "serving.json").write_text(json.dumps(results, indent=1) + "\n")
        for path in plot_serving(results, args.out):
            print(path)


if __name__ == "__main__":
    main()
