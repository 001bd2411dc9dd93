"""Multi-LoRA cost: no adapter vs every request on one of 4 adapters, in one run.

    python perf/bench_lora.py [--rounds 2] [--requests 64] [--dtype auto] [--rank 16]

One engine (the bundled SmolLM2-135M) with 4 random rank-`--rank` adapters on all 7
projections (PEFT's file layout, written to a temporary directory). Each round
runs the same workload twice through the engine client: every request on the
base model, then request i on adapter i % 4 (all 4 resident: `--max-loras 4`).
Requests: ~128-token prompts, 128 new tokens, greedy, EOS ignored, at
concurrency 1 and 32. Reported: output tok/s (median of the rounds) and the
ratio adapters / base (of the medians, and the median of each round's ratio: this
machine's speed drifts between rounds, a round's two runs are back to back).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from perf.bench_engine import make_prompts
from tests.executor.test_lora_layers import write_adapter
from tgi_mp.ipc.messages import SamplingParams
from tgi_mp.launcher import Engine
from tgi_mp.lora_source import LORA_MODULES
from tgi_mp.model_source import load_model_config, resolve_model


def write_adapters(root: Path, n: int, rank: int) -> str:
    """`n` random PEFT LoRA adapters on every projection; the `--lora-adapters` value."""
    mc = load_model_config(resolve_model(None))
    for a in range(n):
        write_adapter(root / f"lora{a}", mc, rank, 2 * rank, LORA_MODULES, a, 0.01)
    return ",".join(f"lora{a}={root / f'lora{a}'}" for a in range(n))


async def run(engine: Engine, prompts: list[list[int]], concurrency: int, adapters: int) -> float:
    """Output tok/s; request i on adapter i % adapters (0: the base model)."""
    client = engine.client()
    sem = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(i: int, prompt: list[int]) -> None:
        nonlocal tokens
        adapter = i % adapters if adapters else -1
        params = SamplingParams(max_new_tokens=128, ignore_eos=True, adapter=adapter)
        async with sem:
            async for _ in client.generate(prompt, params):
                tokens += 1

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return tokens / (time.perf_counter() - t0)
    finally:
        client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4)
    args = ap.parse_args()
    prompts = make_prompts(args.requests, 128)
    results: dict[tuple[int, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec = write_adapters(Path(tmp), args.adapters, args.rank)
        with Engine.start(
            None, dtype=args.dtype, lora_adapters=spec, max_loras=args.adapters
        ) as engine:
            asyncio.run(run(engine, prompts[:4], 4, args.adapters))  # warm-up, slots loaded
            for r in range(args.rounds):
                for c in (1, 32):
                    n = prompts[: 8 if c == 1 else args.requests]
                    for name, adapters in (("base", 0), ("adapters", args.adapters)):
                        tok_s = asyncio.run(run(engine, n, c, adapters))
                        results.setdefault((c, name), []).append(tok_s)
                        print(f"round {r} c{c} {name}: {tok_s:.1f} tok/s", file=sys.stderr)
    print(
        f"dtype {args.dtype}, {args.adapters} adapters of rank {args.rank} on all 7 projections, "
        f"median of {args.rounds} rounds\n"
    )
    print(
        "| concurrency | no adapter tok/s | each request on 1 of 4 adapters tok/s "
        "| ratio of medians | median of each round's ratio |"
    )
    print("|---|---|---|---|---|")
    for c in (1, 32):
        base, lora = results[c, "base"], results[c, "adapters"]
        per_round = statistics.median(b / a for a, b in zip(base, lora, strict=True))
        mb, ml = statistics.median(base), statistics.median(lora)
        print(f"| {c} | {mb:.1f} | {ml:.1f} | {ml / mb:.2f}x | {per_round:.2f}x |")


if __name__ == "__main__":
    main()
