"""The green-list watermark: the split, the bias, sampling under it, and the detector."""

from __future__ import annotations

import math

import numpy as np
import torch

from tests.executor.test_sampler import _columns
from tgi_mp.executor.sampler import sample
from tgi_mp.executor.watermark import apply_watermark, green_mask, score_ids

VOCAB = 50_000


def test_green_lists_hold_gamma_of_the_vocabulary_and_depend_on_the_previous_token() -> None:
    prev = torch.tensor([0, 1, 2, 49_999, 12_345])
    for gamma in (0.25, 0.5):
        mask = green_mask(prev, VOCAB, gamma)
        assert mask.shape == (5, VOCAB)
        share = mask.float().mean(dim=1)
        assert ((share - gamma).abs() < 0.01).all(), share
    mask = green_mask(prev, VOCAB, 0.5)
    # Different predecessors split differently (about half the tokens disagree).
    disagree = (mask[0] != mask[1]).float().mean()
    assert 0.45 < float(disagree) < 0.55
    # A pure function: the same call again, or asked for chosen ids only, agrees.
    assert torch.equal(mask, green_mask(prev, VOCAB, 0.5))
    ids = torch.randint(0, VOCAB, (5, 7))
    assert torch.equal(green_mask(prev, ids, 0.5), mask.gather(1, ids))


def test_bias_is_delta_on_green_tokens_only() -> None:
    logits = torch.randn(3, 1000)
    prev = torch.tensor([4, 5, 6])
    out = apply_watermark(logits, prev, gamma=0.5, delta=2.0)
    green = green_mask(prev, 1000, 0.5)
    assert torch.allclose(out[green], logits[green] + 2.0)
    assert torch.equal(out[~green], logits[~green])


def test_sampling_under_the_watermark_favours_green_as_predicted() -> None:
    # Uniform logits: a draw is green with probability g e^d / (g e^d + 1 - g).
    n, vocab, gamma, delta = 5000, 1000, 0.5, 2.0
    prev = torch.full((n,), 77)
    logits = apply_watermark(torch.zeros(n, vocab), prev, gamma, delta)
    cols = _columns(n, seeds=torch.full((n,), 9), index=torch.arange(n))
    tokens, *_ = sample(logits, cols)
    green = green_mask(prev[:1], vocab, gamma)[0]
    share = float(green[tokens].float().mean())
    want = gamma * math.exp(delta) / (gamma * math.exp(delta) + 1 - gamma)
    assert abs(share - want) < 0.02, (share, want)


def test_detector_z_scores() -> None:
    rng = np.random.default_rng(0)
    plain = [score_ids(rng.integers(0, VOCAB, 200).tolist()) for _ in range(20)]
    assert all(s.scored == 199 for s in plain)
    assert all(abs(s.z) < 4 for s in plain) and not any(s.detected() for s in plain)
    # Always choosing a green successor: every scored token is green, z = sqrt(n).
    ids = [int(rng.integers(0, VOCAB))]
    for _ in range(100):
        ids.append(int(green_mask(torch.tensor([ids[-1]]), VOCAB, 0.5)[0].nonzero()[0]))
    s = score_ids(ids)
    assert s.green == s.scored == 100 and math.isclose(s.z, 10.0) and s.detected()
    assert score_ids([5]).scored == 0
