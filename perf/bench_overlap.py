"""Overlapped scheduling and the shared-memory plan ring, each off and on, in one run.

    python perf/bench_overlap.py [--requests 64] [--new 64] [--concurrency 1,32] [--rounds 3]

Four engines (overlap off/on x shared memory off/on, everything else default:
the bundled model, `--dtype auto`) run at once, idle but one: the same greedy
load runs through each in turn, `--rounds` times (medians reported), through
the engine client (`perf/bench_engine.py`'s driver: ~128-token prompts, EOS
ignored). Reported per point, from the scheduler's counters over the load
alone: output tok/s; the executor's gap between steps (rank 0, from the end of
one step's compute to the start of the next: sending the result, waiting for the
next plan, decoding it; what overlap should shrink; the median from the
histogram's buckets, and the mean, which at c1 holds the gaps between requests
too) and two of its parts, the mean plan decode and result send times; and the
scheduler's planning + result handling per step.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from perf.bench_engine import make_prompts, run_engine
from tgi_mp.ipc.messages import EXECUTOR_TIMINGS, GAP_BUCKETS
from tgi_mp.launcher import Engine

IDLE, DECODE, SEND = (EXECUTOR_TIMINGS.index(n) for n in ("idle", "plan_decode", "result_send"))


async def measure(engine: Engine, prompts: list[list[int]], concurrency: int, new: int) -> dict:
    client = engine.client()
    before = await client.stats()
    out = await run_engine(engine, prompts, concurrency, new)
    after = await client.stats()
    client.close()

    def mean(i: int) -> float:
        (_, s0, n0), (_, s1, n1) = before.executor_timings[i], after.executor_timings[i]
        return (s1 - s0) / max(n1 - n0, 1)

    def median(i: int) -> float:
        """From the histogram's buckets: the bound where half the steps are at or below
        (the gaps between a c1 load's requests would swamp a mean)."""
        (b0, _, n0), (b1, _, n1) = before.executor_timings[i], after.executor_timings[i]
        counts = np.array(b1) - np.array(b0)
        k = int(np.searchsorted(np.cumsum(counts), (n1 - n0) / 2))
        return GAP_BUCKETS[min(k, len(GAP_BUCKETS) - 1)]

    steps = max(after.steps - before.steps, 1)
    out.update(
        idle_ms=median(IDLE) * 1e3,
        idle_mean_ms=mean(IDLE) * 1e3,
        decode_ms=mean(DECODE) * 1e3,
        send_ms=mean(SEND) * 1e3,
        sched_ms=(after.schedule_time - before.schedule_time) / steps * 1e3,
        step_ms=(after.step_time - before.step_time) / steps * 1e3,
    )
    return out


CONFIGS = [(False, False), (False, True), (True, False), (True, True)]  # (overlap, shm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    points = [int(c) for c in args.concurrency.split(",")]
    prompts = make_prompts(args.requests, 128)
    # All four engines up at once, loaded one at a time in turn, round after round: the
    # machine's drift hits every configuration alike; the median round is reported.
    engines = {}
    try:
        for overlap, shm in CONFIGS:
            engines[overlap, shm] = Engine.start(
                None, overlap_scheduling=overlap, shared_memory=shm
            )
        for engine in engines.values():
            asyncio.run(measure(engine, prompts[:4], 4, 8))  # warm-up
        runs: dict[tuple, list[dict]] = {}
        for r in range(args.rounds):
            for key, engine in engines.items():
                for c in points:
                    n = args.requests if c > 1 else max(args.requests // 8, 4)
                    out = asyncio.run(measure(engine, prompts[:n], c, args.new))
                    runs.setdefault((*key, c), []).append(out)
                    print(f"round {r} {key} c{c}: {out['tok_s']:.1f} tok/s", file=sys.stderr)
    finally:
        for engine in engines.values():
            engine.shutdown()

    def median(key: tuple, field: str) -> float:
        return statistics.median(o[field] for o in runs[key])

    print(f"median of {args.rounds} rounds\n")
    print("| overlap | shm | conc | tok/s | executor gap ms/step p50 (mean) | plan decode ms "
          "| result send ms | scheduler ms/step | step ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for overlap, shm in CONFIGS:
        for c in points:
            k = (overlap, shm, c)
            print(
                f"| {'on' if overlap else 'off'} | {'on' if shm else 'off'} | {c} "
                f"| {median(k, 'tok_s'):.1f} | {median(k, 'idle_ms'):.3f} "
                f"({median(k, 'idle_mean_ms'):.3f}) "
                f"| {median(k, 'decode_ms'):.3f} | {median(k, 'send_ms'):.3f} "
                f"| {median(k, 'sched_ms'):.3f} "
                f"| {median(k, 'step_ms'):.2f} |"
            )
    for c in points:
        base, on = (False, False, c), (True, True, c)
        print(
            f"\nc{c}: overlap+shm vs neither: tok/s "
            f"{median(on, 'tok_s') / median(base, 'tok_s'):.3f}x, gap p50 "
            f"{median(on, 'idle_ms') / median(base, 'idle_ms'):.2f}x, mean "
            f"{median(on, 'idle_mean_ms') / median(base, 'idle_mean_ms'):.2f}x"
        )


if __name__ == "__main__":
    main()
