"""How the target checks a step's proposals (speculative decoding), in one forward.

n-gram proposals (the scheduler's lookups) are point masses: the target draws its
token at each proposal's position as that token would be drawn alone, and a row
keeps its proposals up to the first one that differs from the draw before it,
plus that draw: exact for greedy, and rejection sampling for a point-mass proposal.

A draft model's proposals (`executor/drafting.py`) come with the distribution q
they were drawn from: rejection sampling (Leviathan et al. 2023; Chen et al.
2023) keeps proposal x with probability min(1, p(x) / q(x)); at the first
rejection the row's token is drawn from norm(max(0, p - q)); when all are kept,
one more from p. The output distribution is the target's. Greedy rows have
one-hot p and q, so they keep the proposals equal to the target's argmax and then
take its argmax: the same tokens as without speculation. Every random number is a
function of (seed, token index, stream), so seeded requests repeat whatever batch
they share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import numpy as np
import torch

from tgi_mp.executor.logits import (
    LogitsPipeline,
    RowInputs,
    add_bias,
    concat_ranges,
    position_bias,
    row_sampling,
    to_device,
)
from tgi_mp.executor.sampler import (
    ACCEPT_STREAM,
    RESIDUAL_STREAM,
    gumbel_draw,
    hash_uniform,
    reported_logprobs,
    sampling_logprobs,
)
from tgi_mp.ipc.messages import StepPlan

if TYPE_CHECKING:
    from tgi_mp.executor.drafting import Drafts
    from tgi_mp.executor.runner import StepOutput


def ngram_draws(
    pipeline: LogitsPipeline,
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    plan: StepPlan,
    rows: np.ndarray,
    proposed: np.ndarray,
    first: np.ndarray,
    hidden: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """The target's tokens after each proposal of the rows verifying some: position j
    of a row's k (its input the j-th proposal) draws as the row's (j+1)-th token would
    alone, same seed and token index, so accepting the leading matches and the first
    disagreement is exact for greedy and rejection sampling for a point-mass
    proposal (accept x with probability p(x); else the draw, from p without x)."""
    spec = np.flatnonzero(proposed)
    reps = proposed[spec]
    j = concat_ranges(np.ones(len(reps)), reps)  # 1..k within each row
    plan_rows = np.repeat(rows[spec], reps)
    positions = np.repeat(first[spec], reps) + j
    s, dev = plan.sampling, hidden.device
    sampling = row_sampling(plan, plan_rows, dev)
    sampling.sample_index = sampling.sample_index + to_device(j, torch.int64, dev)
    inputs = RowInputs(sampling, int(s.top_n.max()), position_bias(plan, plan_rows, dev))
    pos = to_device(positions, torch.int64, dev)
    tokens, logprobs, top_ids, top_lps = pipeline(compute_logits(hidden[pos]), inputs)
    return (tokens, logprobs) + ((top_ids.to(torch.int32), top_lps) if top_ids is not None else ())


def accept_ngram(
    out: StepOutput, plan: StepPlan, rows: np.ndarray, proposed: np.ndarray, extra: list
) -> None:
    """Each verifying row keeps its first token, then the target's token after each
    proposal as long as the proposal before it was the target's own: 1 + accepted
    tokens per row, in `out`'s arrays row after row (`out.counts`)."""
    ends = np.cumsum(plan.layout.query_lens)[rows]  # one past each row's last input
    inputs = plan.layout.input_ids
    n = len(rows)
    # Rows' first draws are entries 0..n-1 of the joined arrays, their later ones
    # follow from n on, k per verifying row: `keep` picks each row's accepted ones.
    joined = np.concatenate([out.tokens, extra[0]])
    keep, counts, at = [], np.ones(n, dtype=np.int32), n
    for i, k in enumerate(proposed.tolist()):
        keep.append(i)
        if k:
            drawn = np.concatenate([joined[i : i + 1], joined[at : at + k - 1]])
            accepted = int(np.cumprod(drawn == inputs[ends[i] - k : ends[i]]).sum())
            keep.extend(range(at, at + accepted))
            counts[i] = 1 + accepted
            at += k
    out.tokens = joined[keep]
    out.logprobs = np.concatenate([out.logprobs, extra[1]])[keep]
    if out.top_ids is not None:
        out.top_ids = np.concatenate([out.top_ids, extra[2]])[keep]
        out.top_logprobs = np.concatenate([out.top_logprobs, extra[3]])[keep]
    out.counts = counts


def fill_drafts(plan: StepPlan, proposed: np.ndarray, drafts: Drafts) -> StepPlan:
    """The plan with the draft's proposals in the placeholders the scheduler left
    for them (the last `proposed[r]` inputs of plan row r)."""
    layout = plan.layout
    ids = layout.input_ids.copy()
    ends = np.cumsum(layout.query_lens)[np.flatnonzero(proposed)]
    mask = np.arange(drafts.tokens.shape[1])[None, :] < drafts.ks[:, None]
    ids[concat_ranges(ends - drafts.ks, drafts.ks)] = drafts.tokens[mask]
    return msgspec.structs.replace(plan, layout=msgspec.structs.replace(layout, input_ids=ids))


@dataclass
class Verified:
    """The speculating rows' tokens (accepted proposals, then the target's own), row
    after row, `counts[s]` for row s; their reported logprobs and top-n."""

    tokens: np.ndarray
    logprobs: np.ndarray
    counts: np.ndarray
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


def draft_positions(proposed: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Where the target's logits check the drafts: each speculating row's k + 1
    positions (its last real token, then each proposal), row after row. `proposed` and
    `first` (each row's last real token's position) are of the sampled rows."""
    spec = np.flatnonzero(proposed)
    return concat_ranges(first[spec], proposed[spec] + 1)


def check_drafts(
    logits: torch.Tensor,
    plan: StepPlan,
    rows: np.ndarray,
    proposed: np.ndarray,
    drafts: Drafts,
) -> list[torch.Tensor]:
    """Rejection sampling of the draft's proposals against the target's distribution at
    each of the speculating rows' k + 1 positions (position j predicts token j):
    `logits` there (at `draft_positions`). `rows`: the sampled plan rows, `proposed`
    of them. Returns the device tensors `accept_drafts` reads, to download with the
    step's others (one wait)."""
    dev = logits.device
    ks = drafts.ks
    per_row = ks + 1
    plan_rows = np.repeat(rows[np.flatnonzero(proposed)], per_row)
    add_bias(logits, position_bias(plan, plan_rows, dev))
    sampling = row_sampling(plan, plan_rows, dev)
    offset = concat_ranges(np.zeros(len(ks), dtype=np.int64), per_row)
    sampling.sample_index = sampling.sample_index + to_device(offset, torch.int64, dev)
    top_n = int(plan.sampling.top_n.max())
    logp = sampling_logprobs(logits, sampling)
    reported = reported_logprobs(logits, sampling.temperature)
    # The positions that check a proposal: all but each row's last.
    starts = np.cumsum(ks + 1) - (ks + 1)
    checks = to_device(concat_ranges(starts, ks), torch.int64, dev)
    lasts = to_device(starts + ks, torch.int64, dev)
    mask = np.arange(drafts.tokens.shape[1])[None, :] < ks[:, None]
    x = to_device(drafts.tokens[mask], torch.int64, dev)
    assert drafts.logq is not None
    logq = drafts.logq[to_device(mask, torch.bool, dev)]
    q_x = logq.gather(1, x[:, None]).squeeze(1).double().exp()
    p_x = logp[checks].gather(1, x[:, None]).squeeze(1).double().exp()
    seeds, index = sampling.seeds[checks], sampling.sample_index[checks]
    u = hash_uniform(seeds ^ ACCEPT_STREAM, index, 1).squeeze(1)
    accepted = u * q_x <= p_x
    # After a rejection: from what p has more of than q (never empty there: q(x) > p(x)
    # somewhere means p > q elsewhere).
    residual = (logp[checks].exp() - logq.exp()).clamp(min=0).log()
    correction = torch.empty(len(logits), dtype=torch.int64, device=dev)
    correction[checks] = gumbel_draw(residual, seeds, index, RESIDUAL_STREAM)
    last_seeds, last_index = sampling.seeds[lasts], sampling.sample_index[lasts]
    correction[lasts] = gumbel_draw(logp[lasts], last_seeds, last_index)
    wanted = [
        accepted,
        correction.to(torch.int32),
        reported[checks].gather(1, x[:, None]).squeeze(1),
        reported.gather(1, correction[:, None]).squeeze(1),
    ]
    if top_n:
        top = reported.topk(top_n, dim=-1)
        wanted += [top.indices.to(torch.int32), top.values]
    return wanted


def accept_drafts(host: list[np.ndarray], drafts: Drafts) -> Verified:
    """Each speculating row's accepted proposals, then the draw at the first rejected
    one (or after the last): `host` is `check_drafts`' tensors, downloaded."""
    accepted, correction, lp_x, lp_c = host[:4]
    ks = drafts.ks
    starts = np.cumsum(ks + 1) - (ks + 1)
    proposals = drafts.tokens[np.arange(drafts.tokens.shape[1])[None, :] < ks[:, None]]
    tok, lps, pos, counts = [], [], [], np.empty(len(ks), dtype=np.int32)
    at = 0
    for s, k in enumerate(ks.tolist()):
        a = int(np.cumprod(accepted[at : at + k]).sum())
        c = starts[s] + a  # the position whose draw ends the row
        tok += [proposals[at : at + a], correction[c : c + 1]]
        lps += [lp_x[at : at + a], lp_c[c : c + 1]]
        pos.append(np.arange(starts[s], c + 1))
        counts[s] = a + 1
        at += k
    out = Verified(np.concatenate(tok).astype(np.int32), np.concatenate(lps), counts)
    if len(host) > 4:  # top-n alternatives at each kept position
        kept = np.concatenate(pos)
        out.top_ids, out.top_logprobs = host[4][kept], host[5][kept]
    return out


def merge_verified(out: StepOutput, speculated: np.ndarray, verified: Verified) -> None:
    """`out` (one token per sampled row) with the speculating rows' (`speculated`)
    verified tokens in their place, row after row (`out.counts`)."""
    counts = np.ones(len(speculated), dtype=np.int32)
    counts[speculated] = verified.counts
    theirs = np.repeat(speculated, counts)

    def merged(mine: np.ndarray, spec: np.ndarray) -> np.ndarray:
        joined = np.empty((len(theirs), *mine.shape[1:]), dtype=mine.dtype)
        joined[~theirs], joined[theirs] = mine[~speculated], spec
        return joined

    out.tokens = merged(out.tokens, verified.tokens)
    out.logprobs = merged(out.logprobs, verified.logprobs)
    if out.top_ids is not None:
        assert verified.top_ids is not None and verified.top_logprobs is not None
        out.top_ids = merged(out.top_ids, verified.top_ids)
        out.top_logprobs = merged(out.top_logprobs, verified.top_logprobs)
    out.counts = counts
