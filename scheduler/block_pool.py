"""Fixed-size KV blocks with reference counts and a prefix cache; the executors own
the tensors.

A block whose tokens are all computed can be cached under a `BlockKey`: its
tokens plus the key of the block before it, so a key names a whole token
prefix. Keys hash by a chain (the parent's hash and the block's bytes), and
compare by content, so a hash collision can only cost a dict probe, never
serve the wrong KV. A cached block keeps its KV when its last holder lets go:
it waits in an LRU list and is evicted only when a fresh block is needed and
no never-cached free block is left. Partial blocks are never cached.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable

import numpy as np

HashFn = Callable[[int, bytes], int]


def chain_hash(parent: int, data: bytes) -> int:
    return hash((parent, data))


class OutOfBlocks(RuntimeError):
    pass


class BlockKey:
    """The identity of a full block of KV: its token ids and everything before them."""

    __slots__ = ("data", "hash", "parent")

    def __init__(self, parent: BlockKey | None, data: bytes, hash_fn: HashFn) -> None:
        self.parent = parent
        self.data = data
        self.hash = hash_fn(parent.hash if parent is not None else 0, data)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockKey):
            return NotImplemented
        # Walk up while the chains are distinct objects: on a normal hit the parents
        # are the same object at once; only a hash collision pays for the comparison.
        a, b = self, other
        while a is not b:
            if a is None or b is None or a.hash != b.hash or a.data != b.data:
                return False
            a, b = a.parent, b.parent
        return True


class BlockPool:
    """Block ids with reference counts. A block is free exactly when its count is 0.

    Counts above 1 come from sharing: a cached prefix used by several requests.
    """

    def __init__(self, num_blocks: int, block_size: int, hash_fn: HashFn = chain_hash) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.hash_fn = hash_fn
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # free, holding nothing cached
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but cached; LRU first
        self._key: list[BlockKey | None] = [None] * num_blocks
        self._cached: dict[BlockKey, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocks(f"asked for {n} blocks, {self.num_free} free")
        ids = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:  # evict the least recently used cached block
                b, _ = self._evictable.popitem(last=False)
                del self._cached[self._key[b]]
                self._key[b] = None
            self.ref_counts[b] = 1
            ids.append(b)
        return ids

    def share(self, ids: list[int]) -> None:
        """One more holder for each block (a free cached block comes back into use)."""
        for b in ids:
            if self.ref_counts[b] == 0:
                assert b in self._evictable, f"block {b} is free"
                del self._evictable[b]
            self.ref_counts[b] += 1

    def release(self, ids: list[int]) -> None:
        """One holder fewer. Pass a request's blocks in order: the last ones become the
        first to be evicted, so a shared prefix outlives the tails hanging off it."""
        for b in reversed(ids):
            count = self.ref_counts[b] - 1
            assert count >= 0, f"block {b} released twice"
            self.ref_counts[b] = count
            if count == 0:
                if self._key[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    # ------------------------------------------------------------ the prefix cache

    def key(self, parent: BlockKey | None, tokens: np.ndarray) -> BlockKey:
        return BlockKey(
            parent, np.ascontiguousarray(tokens, dtype=np.int32).tobytes(), self.hash_fn
        )

    def match(
        self, tokens: np.ndarray, max_blocks: int, root: BlockKey | None = None
    ) -> tuple[list[int], list[BlockKey]]:
        """The longest cached prefix of `tokens`, in whole blocks (at most `max_blocks`):
        its block ids (not yet shared) and their keys. `root`: the key the chain hangs
        from (a LoRA adapter's own, so no adapter shares another's KV)."""
        bs = self.block_size
        blocks: list[int] = []
        keys: list[BlockKey] = []
        parent = root
        for i in range(min(max_blocks, len(tokens) // bs)):
            b = self._cached.get(self.key(parent, tokens[i * bs : (i + 1) * bs]))
            if b is None:
                break
            parent = self._key[b]
            blocks.append(b)
            keys.append(parent)
        return blocks, keys

    def cache(self, block: int, key: BlockKey) -> None:
        """Offers a block whose tokens are all computed to the cache. A block already
        cached under an equal key keeps serving it; this one stays private."""
        if self._key[block] is None and key not in self._cached:
            self._cached[key] = block
            self._key[block] = key
