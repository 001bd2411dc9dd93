"""Tensor parallelism on CPU: decode throughput with --num-shard 1 vs 2, and what the
broadcast plan and the all-reduces cost.

    python perf/bench_tp.py
    python perf/bench_tp.py --concurrency 8 --new-tokens 64

The bundled SmolLM2's 9 heads do not split in two, so this builds a model of the
same size whose heads do (hidden 512, 8 heads, 4 KV heads, MLP 1536, 30 layers,
vocabulary 49,152: ~135M parameters, random weights, saved as safetensors), then
runs `--concurrency` greedy requests at once on an engine with 1 executor and on
one with 2. Figures per decode-heavy run, from the scheduler's statistics:
step time (plan sent -> tokens back), the executors' forward time, rank 0's time
inside all-reduces, and the rest of the step (the plan broadcast, the result
message and their encoding), each as a share of the step.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tgi_mp.ipc.messages import SamplingParams
from tgi_mp.launcher import Engine


def make_model(directory: str) -> None:
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)


async def run(engine: Engine, concurrency: int, prompt_len: int, new_tokens: int) -> dict:
    client = engine.client()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 49152, prompt_len).tolist() for _ in range(concurrency)]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    before = await client.stats()
    t0 = time.perf_counter()

    async def one(p: list[int]) -> int:
        return sum([1 async for _ in client.generate(p, params)])

    tokens = sum(await asyncio.gather(*(one(p) for p in prompts)))
    wall = time.perf_counter() - t0
    after = await client.stats()
    client.close()
    steps = after.steps - before.steps
    step = after.step_time - before.step_time
    forward = after.forward_time - before.forward_time
    comm = after.comm_time - before.comm_time
    return {
        "tok_s": tokens / wall,
        "step_ms": step / steps * 1000,
        "forward": forward / step,
        "comm": comm / step,
        "ipc": (step - forward) / step,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        make_model(directory)
        print(
            f"~135M-parameter Llama (random weights), float32, {args.concurrency} concurrent "
            f"requests, {args.prompt_len}-token prompts, {args.new_tokens} new tokens\n"
        )
        print(
            "| --num-shard | output tok/s | step ms | forward | of which all-reduce "
            "| plan broadcast + result IPC |"
        )
        print("|---|---|---|---|---|---|")
        for n in (1, 2):
            with Engine.start(
                directory, dtype="float32", num_shards=n, max_batch_total_tokens=8192
            ) as engine:
                asyncio.run(run(engine, 2, 8, 4))  # warm-up
                r = asyncio.run(run(engine, args.concurrency, args.prompt_len, args.new_tokens))
            print(
                f"| {n} | {r['tok_s']:.1f} | {r['step_ms']:.1f} | {r['forward']:.1%} "
                f"| {r['comm']:.1%} | {r['ipc']:.1%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
