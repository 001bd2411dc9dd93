"""Penalty processors and the executor's token histories."""

from __future__ import annotations

import numpy as np
import torch

from tgi_mp.executor.penalties import PenaltyHistory, apply_penalties
from tgi_mp.ipc import messages as m


def test_penalties_match_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 12, generator=gen)
    seen = torch.rand(3, 12, generator=gen) < 0.4
    counts = torch.randint(0, 3, (3, 12), generator=gen, dtype=torch.int32)
    rep, freq, pres = (
        torch.tensor([1.3, 1.0, 0.8]),
        torch.tensor([0.5, 0.0, 1.0]),
        torch.tensor([0.2, 0.0, 0.0]),
    )
    out = apply_penalties(logits, seen, counts, rep, freq, pres)
    for i in range(3):
        for j in range(12):
            x = float(logits[i, j])
            if seen[i, j]:
                x = x / float(rep[i]) if x > 0 else x * float(rep[i])
            c = int(counts[i, j])
            x -= float(freq[i]) * c + float(pres[i]) * (c > 0)
            assert abs(float(out[i, j]) - x) < 1e-6


def plan(seq: int, context: int, tokens: list[int], prompt_len: int, released=(), history=()):
    """One sequence's penalty columns and batch layout."""
    layout = m.BatchLayout(
        query_lens=np.array([len(tokens)], np.int32),
        context_lens=np.array([context], np.int32),
        input_ids=np.array(tokens, np.int32),
        block_counts=np.array([1], np.int32),
        block_tables=np.array([0], np.int32),
    )
    pen = m.PenaltyColumns(
        seq_ids=np.array([seq], np.int64),
        prompt_lens=np.array([prompt_len], np.int32),
        repetition=np.array([1.2], np.float32),
        frequency=np.array([0.0], np.float32),
        presence=np.array([0.0], np.float32),
        released=np.array(released, np.int64),
        history_counts=np.array([len(history)], np.int32),
        history_ids=np.array(history, np.int32),
    )
    return pen, layout


def test_history_follows_chunks_restarts_and_release() -> None:
    h = PenaltyHistory(vocab=20, device=torch.device("cpu"))
    row = int(h.update(*plan(7, 0, [1, 2, 3], prompt_len=5))[0])  # first prompt chunk
    h.update(*plan(7, 3, [4, 5], prompt_len=5))  # rest of the prompt
    h.update(*plan(7, 5, [9], prompt_len=5))  # a generated token fed back
    h.update(*plan(7, 6, [9], prompt_len=5))
    assert h.seen[row].nonzero().squeeze(1).tolist() == [1, 2, 3, 4, 5, 9]
    assert h.counts[row, 9] == 2 and int(h.counts[row].sum()) == 2  # prompt tokens don't count
    h.update(*plan(7, 0, [1, 2, 3, 4, 5, 9, 9], prompt_len=5))  # recomputed after preemption
    assert h.counts[row, 9] == 2 and int(h.seen[row].sum()) == 6
    h.update(*plan(8, 0, [6], prompt_len=1, released=[7]))
    assert 7 not in h.rows and h.rows[8] == row  # the row was freed and reused, fresh
    assert h.seen[row].nonzero().squeeze(1).tolist() == [6] and int(h.counts[row].sum()) == 0


def test_a_sequence_starting_on_a_cached_prefix_gets_its_history() -> None:
    h = PenaltyHistory(vocab=20, device=torch.device("cpu"))
    h.update(*plan(3, 0, [9, 9, 9], prompt_len=3))  # an older occupant of the row
    # Tokens 0..5 came from the prefix cache (6 prompt tokens 1..4, 1, then generated 7, 8
    # are beyond prompt_len 4): the plan carries them, this step computes [11].
    h.update(*plan(3, 0, [1], prompt_len=1, released=[3]))
    row = int(h.update(*plan(4, 6, [11], prompt_len=4, history=[1, 2, 3, 4, 7, 8]))[0])
    assert sorted(h.seen[row].nonzero().squeeze(1).tolist()) == [1, 2, 3, 4, 7, 8, 11]
    assert {i: int(c) for i, c in enumerate(h.counts[row]) if c} == {7: 1, 8: 1, 11: 1}


def test_grow_to_keeps_the_rows_in_use() -> None:
    h = PenaltyHistory(vocab=20, device=torch.device("cpu"))
    row = int(h.update(*plan(5, 0, [3, 4], prompt_len=2))[0])
    h.grow_to(20)  # 8 -> 16 -> 32 rows, as sequences would grow them
    assert h.seen.shape == (32, 20) and len(h.free) == 31 and h.rows == {5: row}
    assert h.seen[row].nonzero().squeeze(1).tolist() == [3, 4]
    others = {int(h.update(*plan(s, 0, [1], prompt_len=1))[0]) for s in range(6, 37)}
    assert len(others) == 31 and row not in others and h.seen.shape[0] == 32
