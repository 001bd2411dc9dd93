"""Which LoRA adapter each executor slot holds: the scheduler's half of executor/lora.py.

The executors hold `num_slots` adapters at once. A request runs only while its
adapter has a slot; an adapter takes a free slot, else the least recently used
one that no running request needs (the executors load it before that step's
forward, and every step before it ran with the old one: plans run in order).
A request whose adapter finds no slot waits in the queue, letting others pass.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from tgi_mp.ipc.messages import LoraColumns
from tgi_mp.scheduler.request import Request


class AdapterSlots:
    def __init__(self, num_slots: int) -> None:
        self.adapter_in = [-1] * num_slots  # adapter index held by each slot
        self.slot_of: dict[int, int] = {}
        self._last_used = [0] * num_slots
        self._clock = 0
        self._loads: list[tuple[int, int]] = []  # (slot, adapter) for the next plan

    def place(self, adapter: int, in_use: Iterable[int]) -> bool:
        """Whether `adapter` has a slot now (taking one that no adapter in `in_use` holds)."""
        self._clock += 1
        slot = self.slot_of.get(adapter)
        if slot is None:
            busy = set(in_use)
            idle = [s for s, a in enumerate(self.adapter_in) if a not in busy]
            if not idle:
                return False
            # An empty slot first, else the one used longest ago.
            slot = min(idle, key=lambda s: (self.adapter_in[s] >= 0, self._last_used[s]))
            self.slot_of.pop(self.adapter_in[slot], None)
            self.adapter_in[slot], self.slot_of[adapter] = adapter, slot
            self._loads.append((slot, adapter))
        self._last_used[slot] = self._clock
        return True

    def columns(self, reqs: list[Request]) -> LoraColumns:
        """The plan's slot per row (-1: base model) and the loads it must do first."""
        slots = np.fromiter(
            (self.slot_of[r.params.adapter] if r.params.adapter >= 0 else -1 for r in reqs),
            np.int32,
            len(reqs),
        )
        loads = np.array(self._loads, dtype=np.int32).reshape(-1, 2)
        self._loads = []
        return LoraColumns(slots, loads[:, 0].copy(), loads[:, 1].copy())
