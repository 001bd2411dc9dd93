"""Decode step time against the memory-bandwidth bound, CUDA graphs on and off.

    python perf/bench_step.py                                  # Llama-3.1-8B, dummy weights
    python perf/bench_step.py --batches 1,8 --context 2048 --steps 50
    python perf/bench_step.py --config path/to/config.json --device cpu --attention torch

One executor (`ModelRunner`, no processes or IPC) runs greedy decode steps: the
step plan's upload, forward, logits, sampling and the download of the sampled ids,
for `batch` sequences of `--context` cached tokens each. A decode step must read
every weight once (the embedding table only by rows) and each sequence's K/V, so
its floor is (weight bytes + KV bytes) / bandwidth, with the bandwidth measured
here by a device-to-device copy. The ratio step / floor is the figure of merit
(1.0 = at the roofline). On the CPU the same script runs (for its own test, or a
look at a small model) against the host's copy bandwidth, without graphs.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tgi_mp.config import EngineConfig
from tgi_mp.executor.runner import ModelRunner, kv_bytes_per_block
from tgi_mp.ipc.messages import (
    BatchLayout,
    LogitBiasColumns,
    PenaltyColumns,
    PromptLogprobColumns,
    SamplingColumns,
    StepPlan,
)
from tgi_mp.model_source import load_model_config, resolve_model
from tgi_mp.options import CHOICES, parse_cuda_graphs

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "llama-3.1-8b.json"


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second moved by a large copy (each byte read once and written once)."""
    # Written first: untouched host pages all map to one zero page and read from cache.
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_plan(step: int, batch: int, context: int, blocks_per_seq: int, vocab: int) -> StepPlan:
    """Greedy decode of `batch` sequences with `context` cached tokens each."""
    i32, f32 = np.int32, np.float32

    def full(value: float, dtype: type, n: int = batch) -> np.ndarray:
        return np.full(n, value, dtype=dtype)

    empty = np.empty(0, dtype=i32)
    return StepPlan(
        step_id=step,
        layout=BatchLayout(
            query_lens=full(1, i32),
            context_lens=full(context, i32),
            input_ids=((np.arange(batch) * 7919 + step) % vocab).astype(i32),
            block_counts=full(blocks_per_seq, i32),
            block_tables=np.arange(batch * blocks_per_seq, dtype=i32),
        ),
        sampling=SamplingColumns(
            sample=full(True, bool),
            temperature=full(0.0, f32),
            top_k=full(0, i32),
            top_p=full(1.0, f32),
            typical_p=full(1.0, f32),
            min_p=full(0.0, f32),
            seeds=full(0, np.int64),
            sample_index=full(step, i32),
            top_n=full(0, i32),
            watermark=full(False, bool),
        ),
        penalties=PenaltyColumns(
            seq_ids=np.arange(batch, dtype=np.int64),
            prompt_lens=full(context, i32),
            repetition=full(1.0, f32),
            frequency=full(0.0, f32),
            presence=full(0.0, f32),
            released=np.empty(0, dtype=np.int64),
            history_counts=full(0, i32),
            history_ids=empty,
        ),
        prompt_logprobs=PromptLogprobColumns(full(0, i32), empty),
        bias=LogitBiasColumns(full(0, i32), empty, np.empty(0, dtype=f32)),
    )


def weight_bytes_read(runner: ModelRunner) -> int:
    """Bytes a decode step reads from the weights: all of them, but an untied
    embedding table only by the rows looked up (negligible)."""
    model = runner.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is not None:
        emb = model.model.embed_tokens.weight
        total -= emb.numel() * emb.element_size()
    return total


def time_steps(runner: ModelRunner, plans: list[StepPlan], warmup: int) -> float:
    """Median seconds per step (each step ends with its sampled ids on the host)."""
    for plan in plans[:warmup]:
        runner.step(plan)
    times = []
    for plan in plans[warmup:]:
        t0 = time.perf_counter()
        runner.step(plan)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="config.json (dummy weights)")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--context", type=int, default=1024, help="cached tokens per sequence")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="auto", choices=CHOICES["device"])
    ap.add_argument("--dtype", default="auto", choices=CHOICES["dtype"])
    ap.add_argument("--attention", default="auto", choices=CHOICES["attention"])
    ap.add_argument("--bandwidth-bytes", type=int, default=1 << 30, help="size of the copy test")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the backend choice

    batches = parse_cuda_graphs(args.batches)
    source = resolve_model(args.config)
    mc = load_model_config(source)
    block_size = 16
    blocks_per_seq = -(-(args.context + args.warmup + args.steps + 1) // block_size)
    with tempfile.TemporaryDirectory(prefix="tgi-mp-bench-") as ipc:
        cfg = EngineConfig(
            model=source,
            model_config=mc,
            ipc_root=ipc,
            load_format="dummy",
            device=args.device,
            dtype=args.dtype,
            attention=args.attention,
            cuda_graphs=batches,
            max_batch_prefill_tokens=max(batches),
            # KV for the largest batch exactly: no profiling forward needed.
            max_batch_total_tokens=max(batches) * blocks_per_seq * block_size,
        )
        runner = ModelRunner(cfg, 0)
    device = runner.device
    bandwidth = copy_bandwidth(device, args.bandwidth_bytes)
    weights = weight_bytes_read(runner)
    per_token_kv = kv_bytes_per_block(cfg, runner.dtype) // block_size
    graphs = runner.graphs
    print(
        f"{mc.architecture} ({Path(args.config).name}), {runner.dtype_name} on {device}, "
        f"attention {runner.attention.name}; weights read per step {weights / 1e9:.2f} GB; "
        f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; context {args.context} tokens"
    )
    print()
    print("| batch | CUDA graphs | step ms | bound ms | step / bound | tok/s |")
    print("|---|---|---|---|---|---|")
    for batch in batches:
        n = args.warmup + args.steps
        plans = [
            decode_plan(s, batch, args.context + s, blocks_per_seq, mc.vocab_size) for s in range(n)
        ]
        kv = batch * (args.context + n // 2) * per_token_kv
        bound = (weights + kv) / bandwidth
        for use_graphs in [True, False] if graphs is not None else [False]:
            runner.graphs = graphs if use_graphs else None
            step = time_steps(runner, plans, args.warmup)
            print(
                f"| {batch} | {'on' if use_graphs else 'off'} | {step * 1e3:.2f} | "
                f"{bound * 1e3:.2f} | {step / bound:.2f} | {batch / step:.0f} |"
            )
    runner.graphs = graphs


if __name__ == "__main__":
    main()
