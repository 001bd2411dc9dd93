"""A draft model's proposals, verified by rejection sampling, keep the target's
distribution (chi-square tests), its greedy tokens, and seeded reproducibility.

Tiny random models with a 16-token vocabulary: a target and a smaller draft (other
shapes, so other weights), both peaked. One step of 5,000 rows with the same context (`CONTEXT`),
each proposing one draft token, seeds 0..4,999, temperature 1: every row's first
token must follow the target's p(. | context) whatever the draft proposed, the rate
of accepted proposals must be sum(min(p, q)), and the token after an accepted x must
follow p(. | context, x).
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch

from tests.executor.test_speculative_sampling import (
    VOCAB,
    chi_square,
    distribution,
    plan,
    tiny_config,
)
from tests.executor.unpacked import float32_unpacked
from tgi_mp.config import EngineConfig
from tgi_mp.executor.runner import ModelRunner
from tgi_mp.model_source import ModelSource, load_model_config

ROWS = 5000


def runner(
    tmp: Path, target: ModelSource, draft: ModelSource | None, speculate: int
) -> ModelRunner:
    cfg = EngineConfig(
        model=target,
        model_config=load_model_config(target),
        ipc_root=str(tmp),
        load_format="dummy",
        device="cpu",
        dtype="float32",
        attention="torch",
        max_batch_prefill_tokens=8 * ROWS,
        max_batch_size=ROWS,
        max_batch_total_tokens=16 * ROWS,
        speculate=speculate,
        draft_model=draft,
        draft_model_config=None if draft is None else load_model_config(draft),
    )
    torch.manual_seed(0)
    with float32_unpacked():  # the LM heads are scaled below
        r = ModelRunner(cfg, 0)
    with torch.no_grad():  # peaked: proposals are often right, and often wrong
        r.model.lm_head.weight.mul_(30)
        if r.draft is not None:
            r.draft.model.lm_head.weight.mul_(30)
    return r


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelRunner, ModelRunner]:
    """The target with the draft, and the draft alone as a target (the same dummy
    weights: they are a function of the config): its steps give q."""
    tmp = tmp_path_factory.mktemp("draft")
    target, draft = tiny_config(tmp / "target.json", 32, 2), tiny_config(tmp / "draft.json", 16, 1)
    return runner(tmp, target, draft, 1), runner(tmp, draft, None, 0)


def with_seeds(p, seeds: np.ndarray, temperature: float = 1.0):
    s = msgspec.structs.replace(
        p.sampling,
        seeds=seeds.astype(np.int64),
        temperature=np.full(len(seeds), temperature, dtype=np.float32),
    )
    return msgspec.structs.replace(p, sampling=s)


def test_draft_proposals_keep_the_target_distribution(models) -> None:
    spec, alone = models
    probe = alone.step(plan(0, rows=1))  # its first draw's top-n: q(. | CONTEXT)
    q0 = distribution(probe.top_ids[0], probe.top_logprobs[0])
    out = spec.step(plan(0, rows=ROWS))  # the placeholder's 0 is replaced by the draft
    assert out.counts is not None and set(out.counts.tolist()) == {1, 2}
    firsts = np.cumsum(out.counts) - out.counts
    p0 = distribution(out.top_ids[0], out.top_logprobs[0])
    assert np.abs(p0 - q0).sum() > 0.3, "draft and target too alike to test rejections"
    first = out.tokens[firsts]
    accepted = out.counts == 2
    expected = np.minimum(p0, q0).sum()
    assert abs(accepted.mean() - expected) < 0.04, (accepted.mean(), expected)
    stat, dof = chi_square(np.bincount(first, minlength=VOCAB), p0)
    assert stat < 2 * dof + 20, f"first token: chi-square {stat:.1f} over {dof} dof"
    # Not q: the test can tell them apart.
    stat, dof = chi_square(np.bincount(first, minlength=VOCAB), q0)
    assert stat > 2 * dof + 20, "p and q too close for this test to see a mix-up"
    # After the most often accepted x: p(. | CONTEXT, x), the bonus token's distribution.
    x = np.bincount(first[accepted], minlength=VOCAB).argmax()
    rows = np.flatnonzero(accepted & (first == x))
    assert len(rows) > 300
    p1 = distribution(out.top_ids[firsts[rows[0]] + 1], out.top_logprobs[firsts[rows[0]] + 1])
    stat, dof = chi_square(np.bincount(out.tokens[firsts[rows] + 1], minlength=VOCAB), p1)
    assert stat < 2 * dof + 20, f"bonus token: chi-square {stat:.1f} over {dof} dof"


def contexts(p, ids: np.ndarray):
    """`p` with row i's 4 input tokens `ids[i]`."""
    layout = msgspec.structs.replace(p.layout, input_ids=ids.astype(np.int32).ravel())
    return msgspec.structs.replace(p, layout=layout)


def test_draft_greedy_is_the_target_greedy_and_seeds_repeat(models) -> None:
    spec = models[0]
    rows = 64
    ids = np.random.default_rng(0).integers(0, VOCAB, (rows, 4))
    ids[:, 3] = 0  # the placeholder
    greedy = spec.step(contexts(with_seeds(plan(0, rows=rows), np.arange(rows), 0.0), ids))
    firsts = np.cumsum(greedy.counts) - greedy.counts
    # The target's own greedy tokens: each context's argmax, and after it its argmax.
    x = greedy.top_ids[firsts, 0]
    assert (greedy.tokens[firsts] == x).all()
    kept = np.flatnonzero(greedy.counts == 2)
    assert 0 < len(kept) < rows, "both accepted and rejected greedy proposals"
    ids[:, 3] = x
    after = spec.step(contexts(plan(0, rows=rows, speculative=False), ids))
    assert (greedy.tokens[firsts[kept] + 1] == after.top_ids[kept, 0]).all()
    # A seed's tokens do not depend on the batch: 64 rows of seed 7 among others, and
    # seed 7 alone, all draw the same.
    seeds = np.where(np.arange(256) % 4 == 0, 7, np.arange(256))
    batch = spec.step(with_seeds(plan(0, rows=256), seeds))
    lone = spec.step(with_seeds(plan(0, rows=1), np.array([7])))
    firsts = np.cumsum(batch.counts) - batch.counts
    want = lone.tokens.tolist()
    for i in np.flatnonzero(seeds == 7):
        assert batch.tokens[firsts[i] : firsts[i] + batch.counts[i]].tolist() == want
