"""Fixed-size KV blocks with reference counts; the executors own the tensors."""

from __future__ import annotations

from collections import deque


class OutOfBlocks(RuntimeError):
    pass


class BlockPool:
    """A free list of block ids. A block is free exactly when its count is 0.

    Counts above 1 come from sharing (a cached prefix, or the `n` choices of
    one prompt); the block returns to the free list when the last holder lets go.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} blocks, {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(n)]
        for b in ids:
            self.ref_counts[b] = 1
        return ids

    def share(self, ids: list[int]) -> None:
        for b in ids:
            assert self.ref_counts[b] > 0, f"block {b} is free"
            self.ref_counts[b] += 1

    def release(self, ids: list[int]) -> None:
        for b in ids:
            count = self.ref_counts[b] - 1
            assert count >= 0, f"block {b} released twice"
            self.ref_counts[b] = count
            if count == 0:
                self._free.append(b)
