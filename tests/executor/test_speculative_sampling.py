"""Speculative verification samples from the target's distribution (a chi-square test).

A tiny random model with a 16-token vocabulary, one step of 5,000 rows with the same
context and one proposal `x` each (its most likely next token), seeds 0..4,999,
temperature 1: the first token of every row must follow p(. | context), and the
second, in the rows where `x` was accepted, p(. | context, x). The distributions
come from plain steps' logprobs (top-n over the whole vocabulary).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tests.executor.unpacked import float32_unpacked
from tgi_mp.config import EngineConfig
from tgi_mp.executor.runner import ModelRunner
from tgi_mp.ipc import messages as m
from tgi_mp.model_source import ModelSource, load_model_config, resolve_model

VOCAB = 16
ROWS = 5000
CONTEXT = [3, 7, 1]


def tiny_config(path: Path, hidden: int, layers: int) -> ModelSource:
    """A tiny Llama of this vocabulary, as a config alone (for dummy weights)."""
    path.write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "hidden_size": hidden,
                "intermediate_size": 2 * hidden,
                "num_hidden_layers": layers,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "vocab_size": VOCAB,
                "max_position_embeddings": 64,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False,
            }
        )
    )
    return resolve_model(str(path))


def tiny_runner(tmp_path: Path) -> ModelRunner:
    source = tiny_config(tmp_path / "config.json", 32, 1)
    cfg = EngineConfig(
        model=source,
        model_config=load_model_config(source),
        ipc_root=str(tmp_path),
        load_format="dummy",
        device="cpu",
        dtype="float32",
        attention="torch",
        max_batch_prefill_tokens=4 * ROWS,
        max_batch_size=ROWS,
        max_batch_total_tokens=16 * ROWS,
    )
    torch.manual_seed(0)  # the dummy weights, hence the two distributions, are fixed
    with float32_unpacked():  # its LM head is scaled below
        runner = ModelRunner(cfg, 0)
    with torch.no_grad():  # peaked enough that the likeliest token is often drawn
        runner.model.lm_head.weight.mul_(30)
    return runner


def plan(proposal: int, rows: int = ROWS, speculative: bool = True) -> m.StepPlan:
    """`rows` rows of CONTEXT + proposal: verifying it, or (not speculative) computing
    the distribution after it."""
    b = rows

    def full(value, dtype) -> np.ndarray:
        return np.full(b, value, dtype=dtype)

    return m.StepPlan(
        step_id=1,
        layout=m.BatchLayout(
            query_lens=full(4, np.int32),
            context_lens=full(0, np.int32),
            input_ids=np.tile(np.array([*CONTEXT, proposal], np.int32), b),
            block_counts=full(1, np.int32),
            block_tables=np.arange(b, dtype=np.int32),
        ),
        sampling=m.SamplingColumns(
            sample=full(True, bool),
            temperature=full(1.0, np.float32),
            top_k=full(0, np.int32),
            top_p=full(1.0, np.float32),
            typical_p=full(1.0, np.float32),
            min_p=full(0.0, np.float32),
            seeds=np.arange(b, dtype=np.int64),
            sample_index=full(0, np.int32),
            top_n=full(VOCAB, np.int32),
            watermark=full(False, bool),
        ),
        penalties=m.PenaltyColumns(
            seq_ids=np.arange(b, dtype=np.int64),
            prompt_lens=full(3, np.int32),
            repetition=full(1.0, np.float32),
            frequency=full(0.0, np.float32),
            presence=full(0.0, np.float32),
            released=np.empty(0, np.int64),
            history_counts=full(0, np.int32),
            history_ids=np.empty(0, np.int32),
        ),
        prompt_logprobs=m.PromptLogprobColumns(full(0, np.int32), np.empty(0, np.int32)),
        bias=m.LogitBiasColumns(full(0, np.int32), np.empty(0, np.int32), np.empty(0, np.float32)),
        speculative=full(1, np.int32) if speculative else None,
    )


def distribution(top_ids: np.ndarray, top_logprobs: np.ndarray) -> np.ndarray:
    p = np.zeros(VOCAB)
    p[top_ids] = np.exp(top_logprobs)
    return p / p.sum()


def chi_square(counts: np.ndarray, p: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over the bins expected to hold at least 5 draws (the rest
    pooled), and its degrees of freedom."""
    expected = p * counts.sum()
    keep = expected >= 5
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    return float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1


def test_verified_tokens_follow_the_target_distribution(tmp_path: Path) -> None:
    runner = tiny_runner(tmp_path)
    probe = runner.step(plan(0))  # the proposal does not change the first draw's logits
    p0 = distribution(probe.top_ids[0], probe.top_logprobs[0])
    x = int(p0.argmax())
    out = runner.step(plan(x))
    assert out.counts is not None and set(out.counts.tolist()) <= {1, 2}
    firsts = np.cumsum(out.counts) - out.counts
    first = out.tokens[firsts]
    accepted = out.counts == 2
    assert ((first == x) == accepted).all(), "accepted exactly when the first draw is x"
    second = out.tokens[firsts[accepted] + 1]
    # p(. | context, x) from the verification position's own logprobs.
    p1 = distribution(
        out.top_ids[firsts[accepted][0] + 1], out.top_logprobs[firsts[accepted][0] + 1]
    )
    assert 0.2 < accepted.mean() < 0.9 and abs(accepted.mean() - p0[x]) < 0.05
    # Generous thresholds: chi-square 99.9th percentiles are ~2x the degrees of freedom
    # + 10 for these sizes; a wrong distribution (e.g. the first position's logits used
    # for the second) lands far above.
    for name, draws, p in (("first", first, p0), ("second", second, p1)):
        stat, dof = chi_square(np.bincount(draws, minlength=VOCAB), p)
        assert stat < 2 * dof + 20, f"{name} token: chi-square {stat:.1f} over {dof} dof"
    # The test can tell the two positions apart: the second draws fail against p0.
    stat, dof = chi_square(np.bincount(second, minlength=VOCAB), p0)
    assert stat > 2 * dof + 20, "p0 and p1 too close for this test to see a mix-up"
