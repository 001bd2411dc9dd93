"""Tensor parallelism (Megatron-style) across the executor processes.

Rank r of N holds 1/N of every large weight: the q/k/v rows of its attention
heads and the gate/up rows of its share of the MLP (column-parallel), and the
matching input columns of `o_proj` and `down_proj` (row-parallel, whose partial
outputs one all-reduce sums). The embedding, the norms and the LM head are
replicated; only rank 0 computes logits and samples. KV heads are split like
the query heads, so the model's head counts must divide by N (checked at start,
with the counts in the message). Ranks join with `torch.distributed`: gloo on
CPU, NCCL on CUDA, rendezvous through a file in the engine's private IPC dir.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist


class TensorParallel:
    def __init__(self, rank: int = 0, size: int = 1) -> None:
        self.rank = rank
        self.size = size
        self.comm_time = 0.0  # seconds spent in all-reduces, for the step statistics

    def share(self, total: int) -> tuple[int, int]:
        """This rank's [start, stop) of a dimension of `total` split evenly."""
        n = total // self.size
        return self.rank * n, (self.rank + 1) * n

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            t0 = time.perf_counter()
            dist.all_reduce(x)
            self.comm_time += time.perf_counter() - t0
        return x

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank (in place)."""
        if self.size > 1:
            t0 = time.perf_counter()
            dist.broadcast(x, src=0)
            self.comm_time += time.perf_counter() - t0
        return x


SINGLE = TensorParallel()


def join(rank: int, size: int, rendezvous_dir: str, device: torch.device) -> TensorParallel:
    """Joins the process group of the engine's executors (blocks until all have)."""
    if size == 1:
        return SINGLE
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"file://{os.path.join(rendezvous_dir, 'tp-rendezvous')}",
        rank=rank,
        world_size=size,
    )
    return TensorParallel(rank, size)
