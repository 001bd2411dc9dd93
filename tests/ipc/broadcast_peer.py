"""One fake executor for test_broadcast.py:
python broadcast_peer.py IPC_ROOT RANK [RING_FD READERS SLOTS SLOT_SIZE].

Reads step plans until `Shutdown`, then reports one checksum per plan (in the
order received) as the token ids of a `StepResult` whose step_id is its rank.
"""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import zmq

from tgi_mp.ipc import messages as m
from tgi_mp.ipc.channels import Endpoints, ExecutorChannels
from tgi_mp.ipc.shm import RingSpec


def checksum(plan: m.StepPlan) -> int:
    h = hashlib.blake2b(str(plan.step_id).encode(), digest_size=4)
    for group in plan.__struct_fields__[1:]:
        columns = getattr(plan, group)
        if not hasattr(columns, "__struct_fields__"):  # an optional array, not a group
            if columns is not None:
                h.update(f"{group}:{columns.dtype.str}:{columns.shape}".encode())
                h.update(columns.tobytes())
            continue
        for name in columns.__struct_fields__:
            arr = getattr(columns, name)
            if arr is None:  # an optional column not sent
                continue
            h.update(f"{group}.{name}:{arr.dtype.str}:{arr.shape}".encode())
            h.update(arr.tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def main() -> None:
    root, rank = sys.argv[1], int(sys.argv[2])
    ring = RingSpec(*map(int, sys.argv[3:7])) if len(sys.argv) > 3 else None
    ctx = zmq.Context()
    ch = ExecutorChannels(ctx, Endpoints(root), ring, rank)
    sums: list[int] = []
    try:
        while not isinstance(msg := ch.plan.recv(), m.Shutdown):
            sums.append(checksum(msg))
            ch.plan.release()  # done reading: the ring may reuse its slot
        ch.results.send(m.StepResult(rank, np.array(sums, dtype=np.int32), 0.0))
    finally:
        ch.close(linger=5000)  # let the report leave before the socket goes
        ctx.term()


if __name__ == "__main__":
    main()
