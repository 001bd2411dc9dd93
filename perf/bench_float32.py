"""float32 decode steps with MKL's sgemm (`F.linear`) vs oneDNN-packed weights, one run.

    python perf/bench_float32.py [--batches 1,8,32] [--repeats 4]

Two executors' models side by side (the bundled SmolLM2-135M, float32, no draft):
one with its linears run by `F.linear` (MKL), one with them packed for oneDNN
(`executor/packed.py`, what `tgi-mp serve` picks where its start-up probe finds
oneDNN faster). Each step: greedy rows at a 200-token context, one new token each
(and a row verifying 3 proposals: 4 positions). Best of two alternating rounds.
Also prints what the probe decides on this machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tgi_mp.executor.packed as packed
from perf.bench_draft import decode_plan
from tgi_mp.config import EngineConfig
from tgi_mp.executor.runner import ModelRunner
from tgi_mp.model_source import load_model_config, resolve_model


def runner(pack_float32: bool) -> ModelRunner:
    """A runner whose float32 linears are packed or not, whatever the probe says."""
    probe = packed.onednn_float32_faster
    packed.onednn_float32_faster = lambda: pack_float32  # read at load only
    try:
        src = resolve_model(None)
        cfg = EngineConfig(
            model=src,
            model_config=load_model_config(src),
            ipc_root=tempfile.mkdtemp(),
            device="cpu",
            dtype="float32",
            max_batch_total_tokens=8192,
        )
        return ModelRunner(cfg, 0)
    finally:
        packed.onednn_float32_faster = probe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    print(f"probe: oneDNN float32 faster here: {packed.onednn_float32_faster()}\n")
    runners = {"MKL (F.linear)": runner(False), "oneDNN packed": runner(True)}
    cases = [(b, 0) for b in map(int, args.batches.split(","))] + [(1, 3)]
    print("| step | MKL ms | oneDNN ms | MKL / oneDNN |")
    print("|---|---|---|---|")
    for rows, k in cases:
        plan = decode_plan(200, k, rows)
        best: dict[str, float] = {}
        for _ in range(2):
            for name, r in runners.items():
                r.step(plan)
                t0 = time.perf_counter()
                for _ in range(args.repeats):
                    r.step(plan)
                ms = (time.perf_counter() - t0) / args.repeats * 1e3
                best[name] = min(best.get(name, ms), ms)
        mkl, onednn = best.values()
        what = f"{rows} rows x 1 token" if not k else f"1 row verifying {k} (4 positions)"
        print(f"| {what} | {mkl:.1f} | {onednn:.1f} | {mkl / onednn:.2f}x |")


if __name__ == "__main__":
    main()
