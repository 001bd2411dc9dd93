"""A shared-memory ring for the step plan's large arrays: one write, N readers.

The scheduler broadcasts every plan to N executors. Over ZeroMQ each executor's
copy goes through the kernel on its own; here a large array is written once into
a slot of a ring that every executor maps, and the message carries only where
it lies (`ipc.codec`'s shared-memory extension: dtype, shape, message sequence
number, offset).

The region is a memfd made by the supervisor before it starts its children and
inherited by them as a file descriptor (`pass_fds`): it has no name, in
`/dev/shm` or anywhere, so it cannot leak — the kernel frees it when the last
process that maps it exits, however it exits (`kill -9` included). That is why
not `multiprocessing.shared_memory` (a named `/dev/shm` file that a killed
creator leaves behind, and whose resource tracker unlinks it under readers on
Python 3.11) and not a file in the runtime directory (a disk-backed `/tmp`
would write the pages back).

Layout: one 64-byte line per reader holding the last sequence number it has
released (int64, -1 at first), then `slots` slots of `slot_size` bytes.
Message `seq` fills slot `seq % slots`; the writer reuses a slot only when every
reader has released the message that used it before (`seq - slots`), so a slot
is never overwritten while an executor still reads it. A reader that stops
releasing (hung, or dead while the supervisor has not yet noticed) makes the
writer wait at most `timeout` seconds, then fail: never forever.
"""

from __future__ import annotations

import mmap
import os
import time

import msgspec
import numpy as np

LINE = 64  # bytes per reader's counter: one cache line, so readers never share one
MAX_READERS = 63
ALIGN = 64  # arrays start on cache lines
DEFAULT_SLOTS = 8  # two messages a step (plan + grammar mask), a step of overlap, and room
DEFAULT_SLOT_SIZE = 4 << 20  # a message's arrays beyond this travel as ZeroMQ frames


class RingSpec(msgspec.Struct, frozen=True):
    """What a child needs to map the ring (part of `EngineConfig`, not a message): the
    descriptor it inherits and the geometry."""

    fd: int
    readers: int
    slots: int = DEFAULT_SLOTS
    slot_size: int = DEFAULT_SLOT_SIZE

    @property
    def header(self) -> int:
        return LINE * (MAX_READERS + 1)

    @property
    def size(self) -> int:
        return self.header + self.slots * self.slot_size


def create_ring(
    readers: int, slots: int = DEFAULT_SLOTS, slot_size: int = DEFAULT_SLOT_SIZE
) -> RingSpec | None:
    """A new anonymous region (the supervisor's); None where memfd is unavailable,
    and then every array travels as a ZeroMQ frame."""
    if not hasattr(os, "memfd_create") or not 0 < readers <= MAX_READERS:
        return None
    fd = os.memfd_create("tgi-mp-plan-ring", os.MFD_CLOEXEC)
    spec = RingSpec(fd, readers, slots, slot_size)
    os.ftruncate(fd, spec.size)  # tmpfs pages: committed only when first written
    released = np.ndarray((readers,), np.int64, mmap.mmap(fd, spec.header), 0, (LINE,))
    released[:] = -1
    return spec


class Ring:
    """One process's mapping of the ring."""

    def __init__(self, spec: RingSpec) -> None:
        self.spec = spec
        self.buf = mmap.mmap(spec.fd, spec.size)
        # Reader r's counter is the int64 at LINE * r.
        self.released = np.ndarray((spec.readers,), np.int64, self.buf, 0, (LINE,))
        self.data = np.ndarray((spec.slots * spec.slot_size,), np.uint8, self.buf, spec.header)

    def slot_offset(self, seq: int) -> int:
        return (seq % self.spec.slots) * self.spec.slot_size

    def view(self, dtype: np.dtype, shape: tuple[int, ...], offset: int) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64))
        arr = np.frombuffer(self.buf, dtype, count, self.spec.header + offset).reshape(shape)
        arr.flags.writeable = False  # the writer's memory: readers only look
        return arr


class RingStalled(TimeoutError):
    """A reader kept a slot past the writer's patience."""


class RingWriter:
    """The scheduler's side: hands out slots in order, each once every reader is done."""

    def __init__(self, ring: Ring, timeout: float) -> None:
        self.ring = ring
        self.timeout = timeout
        self.seq = 0

    def acquire(self) -> tuple[int, int]:
        """(sequence number, slot offset) of the next message; waits for the slot."""
        seq, ring = self.seq, self.ring
        previous = seq - ring.spec.slots  # the message that used this slot before
        if previous >= 0 and int(ring.released.min()) < previous:
            deadline = time.monotonic() + self.timeout
            pause = 20e-6
            while int(ring.released.min()) < previous:
                if time.monotonic() > deadline:
                    slow = np.flatnonzero(ring.released < previous).tolist()
                    raise RingStalled(
                        f"executor(s) {slow} have not released step plan {previous} "
                        f"in {self.timeout:.0f} s"
                    )
                time.sleep(pause)
                pause = min(pause * 2, 1e-3)
        self.seq += 1
        return seq, ring.slot_offset(seq)


class RingReader:
    """An executor's side: releases messages once it no longer reads their arrays."""

    def __init__(self, ring: Ring, rank: int) -> None:
        self.ring = ring
        self.rank = rank
        self.last_seen = -1

    def saw(self, seq: int) -> None:
        self.last_seen = max(self.last_seen, seq)

    def release(self) -> None:
        """Everything seen so far may be overwritten."""
        self.ring.released[self.rank] = self.last_seen
