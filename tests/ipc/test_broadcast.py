"""The scheduler -> executors broadcast over the real sockets, with real processes."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zmq

from tests.ipc.plans import random_plan
from tgi_mp.ipc import messages as m
from tgi_mp.ipc.channels import Endpoints, SchedulerChannels
from tgi_mp.ipc.codec import INLINE_LIMIT, SHM_MIN_BYTES
from tgi_mp.ipc.shm import create_ring

PEER = Path(__file__).with_name("broadcast_peer.py")
_spec = importlib.util.spec_from_file_location("broadcast_peer", PEER)
peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer)

NUM_PEERS = 3
NUM_PLANS = 50


def plan_for(rng: np.random.Generator, step_id: int) -> m.StepPlan:
    b = int(rng.choice([1, 7, 200]))  # 200 rows: most columns become frames
    tokens = int(rng.choice([1, 50, 3000, 70_000]))  # 70k int32: a frame of 280 kB
    return random_plan(rng, b, tokens, step_id)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shm", [False, True], ids=["frames", "shm-ring"])
def test_broadcast_reaches_every_executor_in_order(shm: bool) -> None:
    rng = np.random.default_rng(0)
    plans = [plan_for(rng, i + 1) for i in range(NUM_PLANS)]
    assert any(p.layout.input_ids.nbytes >= INLINE_LIMIT for p in plans)  # some frames...
    assert any(p.layout.input_ids.nbytes < INLINE_LIMIT for p in plans)  # ...and some inline
    # With the ring: arrays above SHM_MIN_BYTES go to it, and a slot of 300 kB cannot
    # take every large plan's arrays (the rest fall back to frames); 3 slots for 50
    # plans make the writer wait for the peers' releases.
    assert any(p.layout.input_ids.nbytes >= SHM_MIN_BYTES for p in plans)
    want = [peer.checksum(p) for p in plans]

    ring = create_ring(NUM_PEERS, slots=3, slot_size=300_000) if shm else None
    ring_args = [str(v) for v in (ring.fd, ring.readers, ring.slots, ring.slot_size)] if shm else []
    ep = Endpoints.create()
    ctx = zmq.Context()
    ch = SchedulerChannels(ctx, ep, ring)
    procs: list[subprocess.Popen] = []
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, str(PEER), ep.root, str(rank), *ring_args],
                pass_fds=(ring.fd,) if shm else (),
            )
            for rank in range(NUM_PEERS)
        ]
        ch.wait_for_subscribers(NUM_PEERS, timeout_ms=30_000)
        for plan in plans:
            ch.plan.send(plan)
        ch.plan.send(m.Shutdown("test over"))  # one write, every peer must see it

        got: dict[int, list[int]] = {}
        while len(got) < NUM_PEERS:
            assert ch.results.sock.poll(30_000), f"only {sorted(got)} reported"
            msg = ch.results.recv()
            assert isinstance(msg, m.StepResult) and msg.step_id not in got
            got[msg.step_id] = msg.token_ids.tolist()
        assert sorted(got) == list(range(NUM_PEERS))
        for rank, sums in got.items():
            assert sums == want, f"peer {rank} saw other plans, or in another order"
        for p in procs:
            assert p.wait(timeout=30) == 0
        if shm:
            assert ch.plan.ring_writer.seq > 3  # the ring was used, and went round
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
        ch.close()
        ctx.term()
        ep.remove()
        if ring is not None:
            os.close(ring.fd)
    assert not os.path.exists(ep.root)
