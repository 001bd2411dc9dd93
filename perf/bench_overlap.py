"""Overlapped scheduling and the shared-memory plan ring, each off and on, in one run.

    python perf/bench_overlap.py [--requests 64] [--new 64] [--concurrency 1,32]

For each of the four engines (overlap off/on x shared memory off/on, everything
else default: the bundled model, `--dtype auto`) the same greedy load runs
through the engine client (`perf/bench_engine.py`'s driver: ~128-token prompts,
EOS ignored). Reported per point, from the scheduler's counters over the load
alone: output tok/s; the executor's mean idle gap per step (rank 0, from its
previous result sent to the next plan decoded: what overlap should remove); the
mean plan decode time; and the scheduler's planning + result handling per step.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from perf.bench_engine import make_prompts, run_engine
from tgi_mp.ipc.messages import EXECUTOR_TIMINGS
from tgi_mp.launcher import Engine

IDLE, DECODE = EXECUTOR_TIMINGS.index("idle"), EXECUTOR_TIMINGS.index("plan_decode")


async def measure(engine: Engine, prompts: list[list[int]], concurrency: int, new: int) -> dict:
    client = engine.client()
    before = await client.stats()
    out = await run_engine(engine, prompts, concurrency, new)
    after = await client.stats()
    client.close()

    def mean(i: int) -> float:
        (_, s0, n0), (_, s1, n1) = before.executor_timings[i], after.executor_timings[i]
        return (s1 - s0) / max(n1 - n0, 1)

    steps = max(after.steps - before.steps, 1)
    out.update(
        idle_ms=mean(IDLE) * 1e3,
        decode_ms=mean(DECODE) * 1e3,
        sched_ms=(after.schedule_time - before.schedule_time) / steps * 1e3,
        step_ms=(after.step_time - before.step_time) / steps * 1e3,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--concurrency", default="1,32")
    args = ap.parse_args()
    points = [int(c) for c in args.concurrency.split(",")]
    prompts = make_prompts(args.requests, 128)
    rows = []
    for overlap in (False, True):
        for shm in (False, True):
            engine = Engine.start(None, overlap_scheduling=overlap, shared_memory=shm)
            try:
                asyncio.run(measure(engine, prompts[:4], 4, 8))  # warm-up
                for c in points:
                    n = args.requests if c > 1 else max(args.requests // 8, 4)
                    r = asyncio.run(measure(engine, prompts[:n], c, args.new))
                    rows.append((overlap, shm, c, r))
                    print(f"overlap={overlap} shm={shm} c{c}: {r}", file=sys.stderr, flush=True)
            finally:
                engine.shutdown()
    print("| overlap | shm | conc | tok/s | executor idle ms/step | plan decode ms "
          "| scheduler ms/step | step ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for overlap, shm, c, r in rows:
        print(
            f"| {'on' if overlap else 'off'} | {'on' if shm else 'off'} | {c} | {r['tok_s']:.1f} "
            f"| {r['idle_ms']:.3f} | {r['decode_ms']:.3f} | {r['sched_ms']:.3f} "
            f"| {r['step_ms']:.2f} |"
        )
    base = {c: r for o, s, c, r in rows if not o and not s}
    for c in points:
        on = next(r for o, s, cc, r in rows if o and s and cc == c)
        print(
            f"\nc{c}: overlap+shm vs neither: tok/s {on['tok_s'] / base[c]['tok_s']:.3f}x, "
            f"idle gap {on['idle_ms'] / base[c]['idle_ms']:.2f}x"
        )


if __name__ == "__main__":
    main()
