"""Greedy sampling of a decode step's logits: torch's ops against the C++ pass.

    python perf/bench_greedy.py                 # bf16 auto dtype, batches 1 and 32

A decode step's logits (float32, the bundled model's batch x vocabulary, values
scaled like its logits) go through `sampler.sample()` (torch: `argmax`,
`log_softmax` over every row, `gather`) and through the logits pipeline's CPU
kernel (`kernels/cpu_logits.cpp`: first argmax and its log-softmax in one read of
the rows, what the executor runs when every row of a step is greedy and none asks
for top-n), alternately, `--rounds` rounds of `--steps` calls each; medians, and
each as a share of the same batch's decode step (forward + LM head + argmax at
context 200, `profile_step.measure`) measured in the same run.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
import torch
from profile_step import _model, measure

from tgi_mp.executor.logits import LogitsPipeline, RowInputs
from tgi_mp.executor.sampler import SamplingTensors, sample
from tgi_mp.model_source import load_model_config, resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    src = resolve_model(None)
    cfg = load_model_config(src)
    model = _model(src, cfg, torch.bfloat16, None, "auto")
    pipeline = LogitsPipeline(cfg.vocab_size, torch.device("cpu"), 0.25, 2.0)
    print("| batch | step ms | sample() ms | kernel ms | sample() share | kernel share |")
    print("|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        opts = argparse.Namespace(context=200, sample=False, steps=10)
        times, _, _ = measure(opts, model, cfg, torch.bfloat16, batch)
        step = float(np.median(times))
        logits = torch.randn(batch, cfg.vocab_size) * 4  # the step's shape and dtype
        columns = SamplingTensors(
            temperature=torch.zeros(batch),
            top_k=torch.zeros(batch, dtype=torch.int64),
            top_p=torch.ones(batch),
            typical_p=torch.ones(batch),
            min_p=torch.zeros(batch),
            seeds=torch.arange(batch),
            sample_index=torch.zeros(batch, dtype=torch.int64),
        )
        runs = {
            "torch": partial(sample, logits, columns),
            "kernel": partial(pipeline, logits, RowInputs(columns, 0)),
        }
        assert torch.equal(runs["torch"]()[0], runs["kernel"]()[0])
        spent: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    run()
                spent[name].append((time.perf_counter() - t0) / args.steps)
        t, k = (float(np.median(spent[n])) for n in ("torch", "kernel"))
        print(
            f"| {batch} | {step * 1e3:.1f} | {t * 1e3:.2f} | {k * 1e3:.2f} | {t / step:.1%} | "
            f"{k / step:.1%} |"
        )


if __name__ == "__main__":
    main()
