"""Reference counts and the free list of the KV block pool."""

from __future__ import annotations

import numpy as np
import pytest

from tgi_mp.scheduler.block_pool import BlockPool, OutOfBlocks


def assert_consistent(pool: BlockPool) -> None:
    """Free exactly when the count is 0: the invariant the scheduler relies on."""
    assert pool.num_free == sum(1 for c in pool.ref_counts if c == 0)
    assert all(c >= 0 for c in pool.ref_counts)


def test_allocate_and_release() -> None:
    pool = BlockPool(8, 16)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert len(set(a + b)) == 8 and set(a + b) == set(range(8))
    assert pool.num_free == 0 and all(c == 1 for c in pool.ref_counts)
    pool.release(a)
    assert pool.num_free == 3 and all(pool.ref_counts[x] == 0 for x in a)
    assert set(pool.allocate(3)) == set(a)  # released blocks are handed out again
    pool.release(list(range(8)))
    assert pool.num_free == 8
    assert_consistent(pool)


def test_allocate_zero_and_blocks_for() -> None:
    pool = BlockPool(4, 16)
    assert pool.allocate(0) == [] and pool.num_free == 4
    assert [pool.blocks_for(n) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]


def test_out_of_blocks_takes_nothing() -> None:
    pool = BlockPool(4, 16)
    held = pool.allocate(3)
    with pytest.raises(OutOfBlocks, match="asked for 2 blocks, 1 free"):
        pool.allocate(2)
    assert pool.num_free == 1  # the failed call allocated nothing
    (extra,) = pool.allocate(1)
    assert extra not in held
    pool.release([*held, extra])
    assert_consistent(pool)


def test_share_counts() -> None:
    pool = BlockPool(4, 16)
    ids = pool.allocate(2)
    pool.share(ids)
    pool.share(ids[:1])
    assert [pool.ref_counts[b] for b in ids] == [3, 2]
    pool.release(ids)
    assert pool.num_free == 2  # both still held by someone
    pool.release(ids)
    assert pool.num_free == 3 and pool.ref_counts[ids[1]] == 0  # the second was last held twice
    pool.release(ids[:1])
    assert pool.num_free == 4
    assert_consistent(pool)


def test_share_free_block_asserts() -> None:
    pool = BlockPool(2, 16)
    with pytest.raises(AssertionError, match="block 1 is free"):
        pool.share([1])


def test_double_release_asserts() -> None:
    pool = BlockPool(2, 16)
    ids = pool.allocate(1)
    pool.release(ids)
    with pytest.raises(AssertionError, match="released twice"):
        pool.release(ids)
    assert pool.num_free == 2 and pool.ref_counts == [0, 0]  # the bad call changed nothing
    with pytest.raises(AssertionError, match="released twice"):
        pool.release([1])  # never allocated


def test_needs_a_block() -> None:
    with pytest.raises(ValueError):
        BlockPool(0, 16)


# ---------------------------------------------------------------- the prefix cache

BS = 4


def fill(pool: BlockPool, tokens: list[int]) -> tuple[list[int], list]:
    """A request computing `tokens` from scratch: its blocks, with the full ones cached."""
    blocks = pool.allocate(pool.blocks_for(len(tokens)))
    keys, parent = [], None
    arr = np.array(tokens, dtype=np.int32)
    for i in range(len(tokens) // BS):
        parent = pool.key(parent, arr[i * BS : (i + 1) * BS])
        pool.cache(blocks[i], parent)
        keys.append(parent)
    return blocks, keys


def test_keys_chain_their_prefix() -> None:
    pool = BlockPool(8, BS)
    a1 = pool.key(None, np.array([1, 2, 3, 4]))
    b1 = pool.key(None, np.array([9, 9, 9, 9]))
    a2 = pool.key(a1, np.array([5, 6, 7, 8]))
    b2 = pool.key(b1, np.array([5, 6, 7, 8]))  # same tokens after another prefix
    assert a2 != b2 and a2.hash != b2.hash
    again = pool.key(pool.key(None, np.array([1, 2, 3, 4])), np.array([5, 6, 7, 8]))
    assert again == a2 and hash(again) == hash(a2) and again is not a2


def test_match_reuses_full_blocks_only() -> None:
    pool = BlockPool(8, BS)
    blocks, _ = fill(pool, list(range(1, 11)))  # 2 full blocks + a 2-token tail
    assert pool.num_cached == 2
    hit, keys = pool.match(np.arange(1, 11, dtype=np.int32), max_blocks=10)
    assert hit == blocks[:2] and len(keys) == 2  # the partial tail is never shared
    hit, _ = pool.match(np.array([1, 2, 3, 4, 5, 6, 7, 0], dtype=np.int32), max_blocks=10)
    assert hit == blocks[:1]  # diverges inside block 2
    assert pool.match(np.arange(1, 11, dtype=np.int32), max_blocks=1)[0] == blocks[:1]
    pool.release(blocks)
    assert pool.num_free == 8 and pool.num_cached == 2  # free, and still cached
    hit, _ = pool.match(np.arange(1, 9, dtype=np.int32), max_blocks=2)
    pool.share(hit)  # back in use, off the eviction list
    assert pool.num_free == 6 and all(pool.ref_counts[b] == 1 for b in hit)
    pool.release(hit)
    assert_consistent(pool)


def test_hash_collisions_never_serve_the_wrong_blocks() -> None:
    pool = BlockPool(16, BS, hash_fn=lambda parent, data: 42)  # every key collides
    a, _ = fill(pool, [1, 2, 3, 4, 5, 6, 7, 8])
    b, _ = fill(pool, [9, 9, 9, 9, 5, 6, 7, 8])
    assert pool.num_cached == 4
    for tokens, want in (([1, 2, 3, 4, 5, 6, 7, 8], a), ([9, 9, 9, 9, 5, 6, 7, 8], b)):
        hit, _ = pool.match(np.array(tokens, dtype=np.int32), max_blocks=2)
        assert hit == want
    assert pool.match(np.array([3, 3, 3, 3, 5, 6, 7, 8], dtype=np.int32), 2)[0] == []
    pool.release(a)
    pool.release(b)
    assert_consistent(pool)


def test_eviction_is_least_recently_used_and_tails_first() -> None:
    pool = BlockPool(4, BS)
    old, _ = fill(pool, [1, 1, 1, 1, 2, 2, 2, 2])
    new, _ = fill(pool, [3, 3, 3, 3, 4, 4, 4, 4])
    pool.release(old)
    pool.release(new)
    assert pool.num_free == 4 and pool.num_cached == 4
    (first,) = pool.allocate(1)
    assert first == old[1]  # the older request's tail goes first, then its head
    (second,) = pool.allocate(1)
    assert second == old[0]
    assert pool.match(np.array([1, 1, 1, 1], dtype=np.int32), 1)[0] == []
    assert pool.match(np.array([3, 3, 3, 3, 4, 4, 4, 4], dtype=np.int32), 2)[0] == new
    pool.release([first, second])
    assert_consistent(pool)
    # Never-cached free blocks are used before any cached one is evicted.
    pool2 = BlockPool(4, BS)
    kept, _ = fill(pool2, [5, 5, 5, 5])
    pool2.release(kept)
    assert kept[0] not in pool2.allocate(3) and pool2.num_cached == 1
