"""Engine throughput against naive transformers, measured in one run.

    python perf/bench_engine.py                      # 64 requests at concurrency 1, 8, 32
    python perf/bench_engine.py --requests 16 --concurrency 8 --baseline-requests 2

Each request: a ~128-token prompt, 128 new tokens, greedy, EOS ignored, sent
through the engine client (scheduler + executor processes over ZeroMQ). The
baseline is transformers `generate` on the same float32 model, one request at
a time, in this process while the engine sits idle. Reported: output tokens/s
and the ratio to the baseline, TTFT and inter-token latency percentiles, and
the scheduler + IPC share of step time (everything in a step that is not the
executor's own input prep + forward + sampling).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.engine.oracle import TEXT, model_paths, tokenizer
from tgi_mp.ipc.messages import SamplingParams
from tgi_mp.launcher import Engine


def make_prompts(n: int, length: int) -> list[list[int]]:
    ids = tokenizer()(TEXT * 2, add_special_tokens=False)["input_ids"]
    return [ids[(i * 7) % 400 : (i * 7) % 400 + length] for i in range(n)]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) * 1000 if xs else float("nan")


SAMPLING = {
    "do_sample": True,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 0.9,
    "repetition_penalty": 1.1,
}


async def run_engine(
    engine: Engine, prompts: list[list[int]], concurrency: int, new: int, sampling: bool = False
) -> dict:
    client = engine.client()
    params = SamplingParams(max_new_tokens=new, ignore_eos=True, **(SAMPLING if sampling else {}))
    sem = asyncio.Semaphore(concurrency)
    ttft: list[float] = []
    itl: list[float] = []
    tokens = 0

    async def one(prompt: list[int]) -> None:
        nonlocal tokens
        async with sem:
            t, gaps = time.perf_counter(), ttft
            async for _ in client.generate(prompt, params):
                now = time.perf_counter()
                gaps.append(now - t)
                t, gaps = now, itl  # the first gap is the TTFT, later ones ITL
                tokens += 1

    before = await client.stats()
    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - t0
    after = await client.stats()
    client.close()
    busy = after.busy_time - before.busy_time
    sched = after.schedule_time - before.schedule_time
    ipc = (after.step_time - before.step_time) - (after.forward_time - before.forward_time)
    return {
        "tok_s": tokens / wall,
        "tokens": tokens,
        "wall": wall,
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "itl_p50": pct(itl, 50),
        "itl_p99": pct(itl, 99),
        "sched_share": sched / busy,
        "ipc_share": ipc / busy,
        "steps": after.steps - before.steps,
    }


@torch.inference_mode()
def run_baseline(prompts: list[list[int]], new: int, dtype: str) -> float:
    from transformers import AutoModelForCausalLM

    path, gguf = model_paths()
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=getattr(torch, dtype))
    model.eval()
    model.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False)  # warm-up
    tokens, t0 = 0, time.perf_counter()
    for p in prompts:
        out = model.generate(
            torch.tensor([p]), max_new_tokens=new, min_new_tokens=new, do_sample=False
        )
        tokens += out.shape[1] - len(p)
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument(
        "--baseline-requests",
        type=int,
        default=8,
        help="requests for the one-at-a-time transformers baseline (a rate; fewer is fine)",
    )
    ap.add_argument("--max-batch-prefill-tokens", type=int, default=4096)
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="for the engine and the baseline alike",
    )
    ap.add_argument("--quantize", default=None, choices=["int8"], help="engine weights only")
    ap.add_argument(
        "--sampling",
        action="store_true",
        help=f"sample ({SAMPLING}, seeded) instead of greedy decoding",
    )
    args = ap.parse_args()

    prompts = make_prompts(args.requests, args.prompt_tokens)
    levels = [int(c) for c in args.concurrency.split(",")]
    weights = f", {args.quantize} weights" if args.quantize else ""
    print(
        f"model: bundled SmolLM2-135M-Instruct ({args.dtype}{weights}, CPU, "
        f"{torch.get_num_threads()} threads)"
    )
    print(
        f"{args.requests} requests x ({args.prompt_tokens} prompt + {args.new_tokens} new tokens)\n"
    )

    capacity = max(levels) * (args.prompt_tokens + args.new_tokens) + 1024
    results = {}
    with Engine.start(
        None,
        dtype=args.dtype,
        quantize=args.quantize,
        max_batch_total_tokens=capacity,
        max_batch_prefill_tokens=args.max_batch_prefill_tokens,
    ) as engine:
        asyncio.run(run_engine(engine, prompts[:2], 2, 4))  # warm-up
        for c in levels:
            results[c] = asyncio.run(run_engine(engine, prompts, c, args.new_tokens, args.sampling))
            r = results[c]
            print(
                f"  engine c={c}: {r['tok_s']:.1f} tok/s ({r['tokens']} tokens, {r['wall']:.1f}s)",
                flush=True,
            )
    base = float("nan")
    if args.baseline_requests:
        base = run_baseline(prompts[: args.baseline_requests], args.new_tokens, args.dtype)
        print(f"  baseline: {base:.1f} tok/s\n")

    print_table(results, base)


def print_table(results: dict[int, dict], base: float) -> None:
    head = (
        "| concurrency | engine tok/s | x baseline | TTFT p50 / p99 ms | ITL p50 / p99 ms "
        "| scheduler share | IPC share |"
    )
    print(head)
    print("|---" * 7 + "|")
    print(f"| transformers generate, 1 at a time | {base:.1f} | 1.00 | | | | |")
    for c, r in results.items():
        print(
            f"| {c} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f} | "
            f"{r['ttft_p50']:.0f} / {r['ttft_p99']:.0f} | "
            f"{r['itl_p50']:.0f} / {r['itl_p99']:.0f} | "
            f"{r['sched_share']:.2%} | {r['ipc_share']:.2%} |"
        )
    overhead = statistics.mean(r["sched_share"] + r["ipc_share"] for r in results.values())
    print(f"\nscheduler + IPC, mean share of step time: {overhead:.2%}")


if __name__ == "__main__":
    main()
