"""How long a step plan takes to reach every executor: ZeroMQ frames vs the shared-memory ring.

    python perf/bench_plan_transport.py [--steps 300] [--readers 1,3]

The scheduler's real channels and codec (`ipc.channels`, `ipc.codec`, `ipc.shm`)
and N reader processes that do what an executor does with a plan before its
forward: decode it, scatter the block tables into the padded table the
attention reads, look at the grammar mask, release the ring slot, and say so.
One step's transport time is from the writer's send to the last reader's word
back (median and p90 over `--steps`), measured for each transport in the same
run, on the plans of the issue: batch 64 at 2k-token contexts (block tables of
128 blocks a row), with and without a grammar mask on a 49k vocabulary; and a
sweep of one array's size, which places `codec.SHM_MIN_BYTES`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import zmq

from tgi_mp.ipc import codec
from tgi_mp.ipc import messages as m
from tgi_mp.ipc.channels import Endpoints, ExecutorChannels, SchedulerChannels
from tgi_mp.ipc.shm import RingSpec, create_ring

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.ipc.plans
VOCAB = 49152
BLOCK = 16


def plan(step_id: int, batch: int, context: int, masked: bool) -> list:
    """The messages of one step: a decode plan (and its grammar mask)."""
    from tests.ipc.plans import random_plan

    rng = np.random.default_rng(step_id)
    p = random_plan(rng, batch, batch, step_id)
    blocks = -(-context // BLOCK)
    p.layout.query_lens[:] = 1
    p.layout.context_lens[:] = context - 1
    p.layout.block_counts[:] = blocks
    p.layout.block_tables = rng.integers(0, 1 << 20, batch * blocks, dtype=np.int32)
    p.grammar = m.GrammarColumns(np.empty(0, np.int32))
    msgs: list = [p]
    if masked:
        p.grammar = m.GrammarColumns(np.arange(batch, dtype=np.int32))
        msgs.append(m.StepMask(step_id, rng.integers(0, 1 << 31, (batch, VOCAB // 32), np.int32)))
    return msgs


def reader(root: str, rank: int, ring: RingSpec | None) -> None:
    ctx = zmq.Context()
    ch = ExecutorChannels(ctx, Endpoints(root), ring, rank)
    ack = ctx.socket(zmq.PUSH)
    ack.connect(f"ipc://{root}/acks")
    try:
        while True:
            msg = ch.plan.recv()
            if isinstance(msg, m.Shutdown):
                return
            if isinstance(msg, m.StepPlan):
                lay = msg.layout
                counts = lay.block_counts
                tables = np.zeros((len(counts), int(counts.max())), dtype=np.int32)
                tables[np.arange(tables.shape[1])[None, :] < counts[:, None]] = lay.block_tables
                if len(msg.grammar.rows):
                    continue  # its mask follows
            elif isinstance(msg, m.StepMask):
                int(msg.bitmask[:, -1].sum())  # touches every row, as the unpacking does
            ch.plan.release()
            ack.send(b"1")
    finally:
        ack.close(0)
        ch.close()
        ctx.term()


def measure(readers: int, shm: bool, steps: list[list], warm: int = 20) -> tuple[float, float]:
    ep = Endpoints.create()
    ring = create_ring(readers) if shm else None
    fork = mp.get_context("fork")  # no zmq context exists yet in this process
    procs = [fork.Process(target=reader, args=(ep.root, r, ring)) for r in range(readers)]
    for p in procs:
        p.start()
    ctx = zmq.Context()
    ch = SchedulerChannels(ctx, ep, ring)
    acks = ctx.socket(zmq.PULL)
    acks.bind(f"ipc://{ep.root}/acks")
    try:
        ch.wait_for_subscribers(readers, 30_000)
        times = []
        for i, msgs in enumerate(steps):
            t0 = time.perf_counter()
            for msg in msgs:
                ch.plan.send(msg)
            for _ in range(readers):
                acks.recv()
            if i >= warm:
                times.append(time.perf_counter() - t0)
        ch.plan.send(m.Shutdown("done"))
        for p in procs:
            p.join(30)
        return float(np.median(times)), float(np.percentile(times, 90))
    finally:
        acks.close(0)
        ch.close()
        ctx.term()
        ep.remove()
        if ring is not None:
            os.close(ring.fd)


def single_array(nbytes: int, n: int) -> list[list]:
    arr = np.random.default_rng(0).integers(0, 1 << 31, nbytes // 4, np.int32)
    return [[m.StepMask(i, arr.reshape(1, -1))] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--readers", default="1,3")
    args = ap.parse_args()
    readers = [int(r) for r in args.readers.split(",")]
    n = args.steps
    print(f"cpus {os.cpu_count()}, SHM_MIN_BYTES {codec.SHM_MIN_BYTES}, {n} steps a case\n")
    print("| plan | readers | ZeroMQ frames ms (p90) | shm ring ms (p90) | shm / frames |")
    print("|---|---|---|---|---|")
    for name, masked in (("batch 64, 2k contexts", False), ("+ grammar mask", True)):
        steps = [plan(i + 1, 64, 2048, masked) for i in range(n)]
        for r in readers:
            (f50, f90), (s50, s90) = measure(r, False, steps), measure(r, True, steps)
            print(
                f"| {name} | {r} | {f50 * 1e3:.3f} ({f90 * 1e3:.3f}) "
                f"| {s50 * 1e3:.3f} ({s90 * 1e3:.3f}) | {s50 / f50:.2f} |"
            )
    print("\n| one array | readers | frames ms | shm ms | shm / frames |")
    print("|---|---|---|---|---|")
    saved = codec.SHM_MIN_BYTES
    codec.SHM_MIN_BYTES = 0  # every array above the inline limit to the ring
    try:
        for kib in (4, 16, 64, 256, 1024):
            steps = single_array(kib << 10, n)
            for r in readers:
                (f50, _), (s50, _) = measure(r, False, steps), measure(r, True, steps)
                print(f"| {kib} KiB | {r} | {f50 * 1e3:.3f} | {s50 * 1e3:.3f} | {s50 / f50:.2f} |")
    finally:
        codec.SHM_MIN_BYTES = saved


if __name__ == "__main__":
    main()
