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
engine client (no HTTP). "scheduler ms" is the scheduler process's own time
(planning, the prefix cache, applying results), the direct cost of the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.engine.oracle import TEXT, tokenizer
from tgi_mp.ipc.messages import SamplingParams
from tgi_mp.launcher import Engine


def shared_prompts(n: int, prefix: int, suffix: int) -> list[list[int]]:
    """Prose for the shared prefix; random token ids where prompts must differ (prose
    repeats, and a repeat would be a cache hit)."""
    shared = tokenizer()(TEXT * 3, add_special_tokens=False)["input_ids"][:prefix]
    rng = np.random.default_rng(0)
    return [shared + rng.integers(100, 40_000, suffix).tolist() for _ in range(n)]


def distinct_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 40_000, length).tolist() for _ in range(n)]


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
        "schedule_ms": (stats.schedule_time - before.schedule_time) * 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--suffix", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--kv-tokens", type=int, default=65536)
    ap.add_argument("--rounds", type=int, default=2, help="of the distinct workload")
    args = ap.parse_args()
    n, length = args.requests, args.prefix + args.suffix
    print(
        f"{n} requests of {args.prefix} + {args.suffix} prompt tokens, "
        f"{args.new_tokens} new tokens each, all sent at once; bundled model, float32\n"
    )
    print(
        "| workload | prefix cache | TTFT p50 / p99 s | total s | output tok/s | hit tokens "
        "| scheduler ms |"
    )
    print("|---|---|---|---|---|---|---|")

    def report(name: str, cache: bool, r: dict) -> None:
        print(
            f"| {name} | {'on' if cache else 'off'} | {r['ttft_p50']:.2f} / "
            f"{r['ttft_p99']:.2f} | {r['total']:.2f} | {r['tok_s']:.1f} "
            f"| {r['hits']} of {r['admitted']} | {r['schedule_ms']:.0f} |",
            flush=True,
        )

    with contextlib.ExitStack() as stack:
        engines = {
            cache: stack.enter_context(
                Engine.start(
                    None,
                    dtype="float32",
                    max_batch_total_tokens=args.kv_tokens,
                    prefix_caching=cache,
                )
            )
            for cache in (True, False)
        }
        for engine in engines.values():  # not measured
            asyncio.run(run(engine, distinct_prompts(1, 64, seed=99), 2))
        shared = {}
        for cache, engine in engines.items():
            shared[cache] = asyncio.run(
                run(engine, shared_prompts(n, args.prefix, args.suffix), args.new_tokens)
            )
            report("shared", cache, shared[cache])
        # 0% hit rate: fresh prompts every round, the engines' order alternating.
        distinct: dict[bool, list[dict]] = {True: [], False: []}
        for k in range(args.rounds):
            for cache in (True, False) if k % 2 == 0 else (False, True):
                r = asyncio.run(
                    run(engines[cache], distinct_prompts(n, length, seed=k), args.new_tokens)
                )
                distinct[cache].append(r)
                report(f"distinct #{k + 1}", cache, r)
    summarize(shared, distinct, args.rounds)


def summarize(shared: dict[bool, dict], distinct: dict[bool, list[dict]], rounds: int) -> None:
    on, off = shared[True], shared[False]
    print(
        f"\nshared prefix: TTFT p50 {off['ttft_p50'] / on['ttft_p50']:.1f}x better with the "
        f"cache, total time {off['total'] / on['total']:.1f}x"
    )

    def mean(cache: bool, key: str) -> float:
        return sum(r[key] for r in distinct[cache]) / len(distinct[cache])

    change = mean(True, "tok_s") / mean(False, "tok_s") - 1
    print(
        f"0% hit rate: throughput with the cache {change:+.1%} vs without "
        f"(mean of {rounds} rounds); scheduler time "
        f"{mean(True, 'schedule_ms'):.0f} vs {mean(False, 'schedule_ms'):.0f} ms per round"
    )


if __name__ == "__main__":
    main()
