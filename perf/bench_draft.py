"""What a draft model costs and when it pays: one executor, in one run.

    python perf/bench_draft.py [--target default|CONFIG.json] [--draft default]
                               [--k 1,2,3,4] [--dtype float32] [--context 200]

For a target and a draft (`default`: the bundled SmolLM2-135M; a config .json:
that model's shapes with dummy weights, e.g. SmolLM2-1.7B's, which is not on this
disk), at batch 1 and a `--context`-token history: the target's plain decode step
(`T1`, no draft loaded), and the speculative step with k proposals (`Tk`: the
draft's pass over the step, its k decodes, the target's forward over k + 1
positions and the verification). A step yields 1 + (accepted) tokens; with each
proposal accepted with probability a, on average (1 - a^(k+1)) / (1 - a), so the
speed-up is that times T1 / Tk. Printed: Tk / T1, the acceptance rate where the
draft breaks even, and the speed-up at a = 0.6 / 0.8 / 0.9 (a depends on the pair
and the text: measure it with `perf/bench_speculate.py --speculative-model`).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.executor.test_speculative_sampling import plan as base_plan
from tgi_mp.config import EngineConfig
from tgi_mp.executor.runner import ModelRunner
from tgi_mp.model_source import default_gguf_path, load_model_config, resolve_model


def source(spec: str):
    return resolve_model(default_gguf_path() if spec == "default" else spec)


def decode_plan(context: int, k: int, rows: int = 1) -> msgspec.Struct:
    """`rows` greedy rows at `context` tokens each: their last token and k placeholders."""
    p = base_plan(0, rows=rows)
    blocks = -(-(context + k + 1) // 16)

    def full(value: int) -> np.ndarray:
        return np.full(rows, value, dtype=np.int32)

    layout = msgspec.structs.replace(
        p.layout,
        query_lens=full(1 + k),
        context_lens=full(context),
        input_ids=np.tile(np.array([5] + [0] * k, np.int32), rows),
        block_counts=full(blocks),
        block_tables=np.arange(rows * blocks, dtype=np.int32),
    )
    sampling = msgspec.structs.replace(
        p.sampling, temperature=np.zeros(rows, np.float32), top_n=full(0)
    )
    penalties = msgspec.structs.replace(p.penalties, prompt_lens=full(context))
    return msgspec.structs.replace(
        p, layout=layout, sampling=sampling, penalties=penalties, speculative=full(k) if k else None
    )


def timed(runner: ModelRunner, plan, repeats: int) -> float:
    runner.step(plan)  # warm
    t0 = time.perf_counter()
    for _ in range(repeats):
        runner.step(plan)
    return (time.perf_counter() - t0) / repeats


def make_runner(args, target, draft) -> ModelRunner:
    dummy = target.kind == "hf" and target.config_file != "config.json"
    cfg = EngineConfig(
        model=target,
        model_config=load_model_config(target),
        ipc_root=tempfile.mkdtemp(),
        device="cpu",
        dtype=args.dtype,
        load_format="dummy" if dummy else "auto",
        max_batch_total_tokens=args.context + 64,
        speculate=max(args.ks) if draft is not None else 0,
        draft_model=draft,
        draft_model_config=None if draft is None else load_model_config(draft),
    )
    return ModelRunner(cfg, 0)


def speedup(a: float, k: int, ratio: float) -> float:
    return (1 - a ** (k + 1)) / (1 - a) / ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="default")
    ap.add_argument("--draft", default="default")
    ap.add_argument("--k", default="1,2,3,4")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    args.ks = [int(k) for k in args.k.split(",")]
    target, draft = source(args.target), source(args.draft)
    torch.manual_seed(0)
    prefill = decode_plan(0, 0)
    prefill = msgspec.structs.replace(
        prefill,
        layout=msgspec.structs.replace(
            prefill.layout,
            query_lens=np.array([args.context], np.int32),
            input_ids=np.arange(100, 100 + args.context, dtype=np.int32),
            block_counts=np.array([-(-(args.context + 8) // 16)], np.int32),
            block_tables=np.arange(-(-(args.context + 8) // 16), dtype=np.int32),
        ),
    )
    plain = make_runner(args, target, None)
    plain.step(prefill)
    t1 = timed(plain, decode_plan(args.context, 0), args.repeats)
    del plain
    gc.collect()
    spec = make_runner(args, target, draft)
    spec.step(prefill)
    rows = []
    for k in args.ks:
        tk = timed(spec, decode_plan(args.context, k), args.repeats)
        ratio = tk / t1
        # Break-even: the a where the expected tokens a step equal Tk / T1.
        lo, hi = 0.0, 0.999999
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if speedup(mid, k, ratio) < 1 else (lo, mid)
        rows.append((k, tk, ratio, hi, *(speedup(a, k, ratio) for a in (0.6, 0.8, 0.9))))
    tm, dm = load_model_config(target), load_model_config(draft)
    print(
        f"target {target.model_id} ({tm.num_layers} layers, hidden {tm.hidden_size}), "
        f"draft {draft.model_id} ({dm.num_layers} layers, hidden {dm.hidden_size}), "
        f"{args.dtype}, batch 1, context {args.context}, {torch.get_num_threads()} threads"
    )
    print(f"\nplain decode step T1 = {t1 * 1000:.1f} ms\n")
    print("| k | Tk ms | Tk / T1 | break-even acceptance | speed-up at 0.6 | 0.8 | 0.9 |")
    print("|---|---|---|---|---|---|---|")
    for k, tk, ratio, even, s6, s8, s9 in rows:
        print(
            f"| {k} | {tk * 1000:.1f} | {ratio:.2f} | {even:.2f} | "
            f"{s6:.2f}x | {s8:.2f}x | {s9:.2f}x |"
        )


if __name__ == "__main__":
    main()
