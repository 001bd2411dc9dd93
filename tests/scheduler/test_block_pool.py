"""Reference counts and the free list of the KV block pool."""

from __future__ import annotations

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
