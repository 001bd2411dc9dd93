"""Prefix caching on vs off, in one run: time to first token and total time.

    python perf/bench_prefix.py
    python perf/bench_prefix.py --requests 32 --prefix 1024 --suffix 32 --new-tokens 16

Two workloads, each run on an engine with the prefix cache on and one with it
off (the bundled model, float32, the same KV capacity):

* shared: `--requests` prompts that share a `--prefix`-token prefix and end in
  `--suffix` distinct tokens, all sent at once, `--new-tokens` greedy tokens each;
* distinct: the same count and lengths with nothing shared (0% hit rate), to
  show what the cache costs when it cannot help.

TTFT is measured from submission to the first token, per request, through the
engine client (no HTTP).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.engine.oracle import TEXT, tokenizer
from tgi_mp.ipc.messages import SamplingParams
from tgi_mp.launcher import Engine


def workloads(n: int, prefix: int, suffix: int) -> dict[str, list[list[int]]]:
    """Prose for the shared prefix; random token ids where prompts must differ (prose
    repeats, and a repeat would be a cache hit)."""
    shared = tokenizer()(TEXT * 3, add_special_tokens=False)["input_ids"][:prefix]
    rng = np.random.default_rng(0)

    def rand(k: int) -> list[int]:
        return rng.integers(100, 40_000, k).tolist()

    return {
        "shared": [shared + rand(suffix) for _ in range(n)],
        "distinct": [rand(prefix + suffix) for _ in range(n)],
    }


async def run(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    client = engine.client()
    ttft: list[float] = []
    tokens = 0

    async def one(prompt: list[int]) -> None:
        nonlocal tokens
        t0 = time.perf_counter()
        async for _ in client.generate(prompt, params):
            if tokens_of[id(prompt)] == 0:
                ttft.append(time.perf_counter() - t0)
            tokens_of[id(prompt)] += 1
            tokens += 1

    tokens_of = {id(p): 0 for p in prompts}
    before = await client.stats()
    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    total = time.perf_counter() - t0
    stats = await client.stats()
    client.close()
    return {
        "ttft_p50": float(np.percentile(ttft, 50)),
        "ttft_p99": float(np.percentile(ttft, 99)),
        "total": total,
        "tok_s": tokens / total,
        "hits": stats.cache_hit_tokens - before.cache_hit_tokens,
        "admitted": stats.admitted_tokens - before.admitted_tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--suffix", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--kv-tokens", type=int, default=65536)
    args = ap.parse_args()
    loads = workloads(args.requests, args.prefix, args.suffix)
    print(
        f"{args.requests} requests of {args.prefix} + {args.suffix} prompt tokens, "
        f"{args.new_tokens} new tokens each, all sent at once; bundled model, float32\n"
    )
    print("| workload | prefix cache | TTFT p50 / p99 s | total s | output tok/s | hit tokens |")
    print("|---|---|---|---|---|---|")
    results = {}
    for cache in (True, False):
        with Engine.start(
            None, max_batch_total_tokens=args.kv_tokens, prefix_caching=cache
        ) as engine:
            asyncio.run(run(engine, [loads["distinct"][0][:64]], 2))  # warm-up, not measured
            for name in ("shared", "distinct"):
                r = asyncio.run(run(engine, loads[name], args.new_tokens))
                results[name, cache] = r
                print(
                    f"| {name} | {'on' if cache else 'off'} | {r['ttft_p50']:.2f} / "
                    f"{r['ttft_p99']:.2f} | {r['total']:.2f} | {r['tok_s']:.1f} "
                    f"| {r['hits']} of {r['admitted']} |",
                    flush=True,
                )
    on, off = results["shared", True], results["shared", False]
    print(
        f"\nshared prefix: TTFT p50 {off['ttft_p50'] / on['ttft_p50']:.1f}x better with the "
        f"cache, total time {off['total'] / on['total']:.1f}x"
    )
    d_on, d_off = results["distinct", True], results["distinct", False]
    print(
        f"0% hit rate: throughput with the cache {d_on['tok_s'] / d_off['tok_s'] - 1:+.1%} "
        "vs without"
    )


if __name__ == "__main__":
    main()
