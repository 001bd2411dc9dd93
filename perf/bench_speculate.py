"""Speculative decoding off vs on (n-gram, or a draft model), through HTTP, in one run.

    python perf/bench_speculate.py [--rounds 2] [--max-tokens 200] [--speculate 4]
                                   [--speculate-max-batch N] [--speculative-model ID]
                                   [--concurrency 1,8]

Two `tgi-mp serve` (default settings; one with `--speculate N`) run side by side,
idle but the one measured; each workload runs through each in turn, `--rounds`
times (medians). Workloads, on `/v1/chat/completions`, greedy, EOS honoured:
(a) grounded: a ~500-token Python module and "repeat it with one change" (the
answer quotes its input, where n-gram proposals pay); (b) free chat: short
open questions. Reported: output tok/s at concurrency 1 and 8, and the
acceptance rate from `/metrics` (`tgi_mp_spec_accepted_tokens` /
`tgi_mp_spec_proposed_tokens` over the run).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.frontend.server import Server


def module_source() -> str:
    """A plain ~500-token Python module, generated deterministically."""
    parts = ['"""Inventory helpers."""\n\nfrom dataclasses import dataclass\n\n']
    parts.append("@dataclass\nclass Item:\n    name: str\n    price: float\n    count: int\n\n")
    for i, (verb, op) in enumerate(
        [("total", "+"), ("largest", "max"), ("cheapest", "min"), ("average", "mean")]
    ):
        parts.append(
            f"def compute_{verb}(items: list[Item]) -> float:\n"
            f'    """The {verb} over the items\' values (price times count)."""\n'
            f"    values = [item.price * item.count for item in items]\n"
            f"    if not values:\n"
            f"        return 0.0\n"
            f"    result = values[0]\n"
            f"    for value in values[1:]:\n"
            f"        result = {'result + value' if op == '+' else f'{op}(result, value)' if op != 'mean' else 'result + value'}\n"  # noqa: E501
            f"    return result{' / len(values)' if op == 'mean' else ''}\n\n"
        )
        parts.append(f"LIMIT_{i} = {100 * (i + 1)}\n\n")
    return "".join(parts)


GROUNDED = [
    f"Here is a Python module:\n\n```python\n{module_source()}```\n\n"
    f"Repeat the whole module exactly, but rename `compute_{name}` to `{new}`."
    for name, new in (
        ("total", "sum_values"),
        ("largest", "max_value"),
        ("cheapest", "min_value"),
        ("average", "mean_value"),
    )
]
FREE = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain why the sky is blue to a ten-year-old.",
    "Give me three ideas for a weekend trip in the mountains, with a sentence on each.",
    "What are the pros and cons of working from home? Answer in a few paragraphs.",
]


async def run(url: str, prompts: list[str], concurrency: int, n: int, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(client: httpx.AsyncClient, prompt: str) -> None:
        nonlocal tokens
        async with sem:
            r = await client.post(
                f"{url}/v1/chat/completions",
                json={
                    "model": "tgi",
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                },
                timeout=600,
            )
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient() as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, prompts[i % len(prompts)]) for i in range(n)))
        wall = time.perf_counter() - t0
    return {"tok_s": tokens / wall, "tokens": tokens}


def spec_counts(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics").text
    values = {}
    for line in text.splitlines():
        for name in ("tgi_mp_spec_proposed_tokens", "tgi_mp_spec_accepted_tokens"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return values["tgi_mp_spec_proposed_tokens"], values["tgi_mp_spec_accepted_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--speculate", type=int, default=4)
    ap.add_argument("--speculate-max-batch", type=int, default=None, help="default: the server's")
    ap.add_argument("--speculative-model", default=None, help="a draft model (default: n-gram)")
    ap.add_argument("--concurrency", default="1,8")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    on = ["--speculate", str(args.speculate)]
    if args.speculate_max_batch is not None:
        on += ["--speculate-max-batch", str(args.speculate_max_batch)]
    if args.speculative_model is not None:
        on += ["--speculative-model", args.speculative_model]
    servers = {"off": Server("--dtype", "auto"), "on": Server("--dtype", "auto", *on)}
    results: dict[tuple, list[float]] = {}
    rates: dict[str, tuple[float, float]] = {}
    try:
        for server in servers.values():  # warm-up
            asyncio.run(run(server.url, FREE[:1], 1, 1, 16))
        for workload, prompts in (("grounded", GROUNDED), ("free chat", FREE)):
            before = spec_counts(servers["on"].url)
            for r in range(args.rounds):
                for c, n in ((c, 4 if c == 1 else 2 * c) for c in levels):
                    for name, server in servers.items():
                        out = asyncio.run(run(server.url, prompts, c, n, args.max_tokens))
                        results.setdefault((workload, c, name), []).append(out["tok_s"])
                        print(f"round {r} {workload} c{c} {name}: {out}", file=sys.stderr)
            after = spec_counts(servers["on"].url)
            rates[workload] = (after[0] - before[0], after[1] - before[1])
    finally:
        for server in servers.values():
            server.stop()
    print(f"median of {args.rounds} rounds, on: {' '.join(on)}\n")
    print("| workload | concurrency | off tok/s | on tok/s | on / off |")
    print("|---|---|---|---|---|")
    for (workload, c, name), values in results.items():
        if name != "on":
            continue
        off = statistics.median(results[workload, c, "off"])
        on = statistics.median(values)
        print(f"| {workload} | {c} | {off:.1f} | {on:.1f} | {on / off:.2f}x |")
    for workload, (proposed, accepted) in rates.items():
        rate = accepted / proposed if proposed else float("nan")
        print(f"\n{workload}: {accepted:.0f} of {proposed:.0f} proposals accepted ({rate:.0%})")


if __name__ == "__main__":
    main()
