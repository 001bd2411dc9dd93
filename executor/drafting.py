"""Speculative decoding with a draft model (`--speculative-model`), in the executor.

The draft runs beside the target with its own KV cache in the target's block ids:
the scheduler's block tables serve both. Each step it first computes every
token the target computes, minus the proposals' placeholders (so its cache never
falls behind), then proposes each speculating row's k tokens one decode at a time
and computes the last one's KV too: whatever the target accepts, the draft's
cache is then valid wherever the target's is.

The target checks the proposals in its one forward, by rejection sampling
(Leviathan et al. 2023; Chen et al. 2023): proposal x, drawn from the draft's
distribution q, is kept with probability min(1, p(x) / q(x)); at the first
rejection the row's token is drawn from norm(max(0, p - q)); when all are kept,
one more from p. The output distribution is the target's. Greedy rows have
one-hot p and q, so they keep the proposals equal to the target's argmax and then
take its argmax: the same tokens as without speculation. Every random number is a
function of (seed, token index, stream), so seeded requests repeat whatever
batch they share.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tgi_mp.config import EngineConfig
from tgi_mp.executor.logits import to_device
from tgi_mp.executor.parallel import TensorParallel
from tgi_mp.executor.sampler import (
    SamplingTensors,
    _i64,
    apply_min_p,
    apply_top_k_top_p,
    apply_typical_p,
    hash_uniform,
)
from tgi_mp.executor.staging import HostStaging
from tgi_mp.ipc.messages import StepPlan
from tgi_mp.kernels.attention import AttentionInputs, allocate_kv_cache
from tgi_mp.kernels.backends import AttentionBackend

# Independent random streams of one (seed, token index): the draft's draw, the
# acceptance test and the draw after a rejection (the target's own draw keeps the
# stream plain sampling uses).
_DRAFT = _i64(0x8CB92BA72F3D8DD7)
_ACCEPT = _i64(0x4F1BBCDCBFA53E0B)
_RESIDUAL = _i64(0x2545F4914F6CDD1D)


def sampling_logprobs(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Log-probabilities of the distribution each row's token is drawn from (after
    temperature, typical-p, min-p, top-k and top-p; -inf where excluded), float32
    [B, V]. Greedy rows: 0 at the argmax, -inf elsewhere."""
    out = torch.full_like(logits, float("-inf"), dtype=torch.float32)
    greedy = t.temperature <= 0
    g = greedy.nonzero().squeeze(1)
    out[g, logits[g].argmax(dim=-1)] = 0.0
    rows = (~greedy).nonzero().squeeze(1)
    if rows.numel() == 0:
        return out
    top = torch.finfo(logits.dtype).max
    scaled = (logits[rows] / t.temperature[rows, None]).clamp(max=top)
    typical, min_p = t.typical_p[rows], t.min_p[rows]
    if bool((typical < 1).any()):
        scaled = apply_typical_p(scaled, typical)
    if bool((min_p > 0).any()):
        scaled = apply_min_p(scaled, min_p)
    top_k, top_p = t.top_k[rows], t.top_p[rows]
    cut = ((top_k > 0) | (top_p < 1)).nonzero().squeeze(1)
    if cut.numel():  # as plain sampling: only the rows that truncate are truncated
        scaled[cut] = apply_top_k_top_p(scaled[cut], top_k[cut], top_p[cut])
    out[rows] = scaled.float().log_softmax(dim=-1)
    return out


def gumbel_draw(
    logp: torch.Tensor, seeds: torch.Tensor, index: torch.Tensor, stream: int = 0
) -> torch.Tensor:
    """One id per row from exp(logp) (unnormalised is fine), Gumbel-max with the
    counter-based noise of (seed ^ stream, index): int64 [B]."""
    u = hash_uniform(seeds ^ stream, index, logp.shape[-1])
    return (logp.double() - torch.log(-torch.log(u))).argmax(dim=-1)


def reported_logprobs(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """What TGI reports: log-softmax after temperature, before any truncation."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    top = torch.finfo(logits.dtype).max
    return (logits / t[:, None]).clamp(max=top).float().log_softmax(dim=-1)


def position_bias(
    plan: StepPlan, plan_rows: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The logit bias of `plan_rows` (one logits row each, in that order, repeats
    allowed): (logits row, token id, value), or None when none of them has any."""
    b = plan.bias
    if not len(b.ids):
        return None
    counts = b.counts[plan_rows]
    if not counts.any():
        return None
    at = (np.cumsum(b.counts) - b.counts)[plan_rows]
    entry = concat_ranges(at, counts)
    return (
        to_device(np.repeat(np.arange(len(plan_rows)), counts), torch.int64, device),
        to_device(b.ids[entry], torch.int64, device),
        to_device(b.values[entry], torch.float32, device),
    )


def add_bias(logits: torch.Tensor, bias: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
    if bias is not None:
        row, ids, values = bias
        logits.index_put_((row, ids), values.to(logits.dtype), accumulate=True)
    return logits


def row_sampling(plan: StepPlan, plan_rows: np.ndarray, device: torch.device) -> SamplingTensors:
    """`plan_rows`' sampling columns on the device (their sample index: the next token's)."""
    s = plan.sampling
    return SamplingTensors(
        to_device(s.temperature[plan_rows], torch.float32, device),
        to_device(s.top_k[plan_rows], torch.int64, device),
        to_device(s.top_p[plan_rows], torch.float32, device),
        to_device(s.typical_p[plan_rows], torch.float32, device),
        to_device(s.min_p[plan_rows], torch.float32, device),
        to_device(s.seeds[plan_rows], torch.int64, device),
        to_device(s.sample_index[plan_rows], torch.int64, device),
    )


def _at(t: SamplingTensors, rows: torch.Tensor, offset: torch.Tensor | int) -> SamplingTensors:
    """Rows of `t` (repeats allowed), their sample index moved on by `offset`."""
    cols = {name: col[rows] for name, col in vars(t).items()}
    cols["sample_index"] = cols["sample_index"] + offset
    return SamplingTensors(**cols)


@dataclass
class Drafts:
    """A step's proposals: `tokens` [S, K] host int32 (row s's first `ks[s]` are real),
    and on rank 0 the draft's log-distributions they were drawn from [S, K, V]."""

    tokens: np.ndarray
    logq: torch.Tensor | None
    ks: np.ndarray


class DraftModel:
    """The draft model of one executor: weights (this rank's shard), its KV cache."""

    def __init__(
        self,
        cfg: EngineConfig,
        model: torch.nn.Module,
        attention: AttentionBackend,
        num_blocks: int,
        tp: TensorParallel,
        staging: HostStaging,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        mc = cfg.draft_model_config
        assert mc is not None
        self.model, self.attention, self.tp = model, attention, tp
        self.staging, self.device = staging, device
        self.block_size = cfg.block_size
        self.kv_caches = allocate_kv_cache(
            mc.num_layers,
            num_blocks,
            cfg.block_size,
            mc.num_kv_heads // cfg.num_shards,
            mc.head_dim,
            dtype,
            device,
        )

    def _forward(
        self,
        query_lens: np.ndarray,
        context_lens: np.ndarray,
        tables: np.ndarray,
        input_ids: np.ndarray | torch.Tensor,
    ) -> torch.Tensor:
        attn = AttentionInputs.plan(
            query_lens,
            context_lens,
            tables,
            self.block_size,
            reference=self.attention.reference_plan,
        )
        if isinstance(input_ids, np.ndarray):
            uploaded = self.staging.upload([*attn.arrays, input_ids])
            meta, ids = attn.on_device(uploaded[:-1]), uploaded[-1]
        else:
            meta, ids = attn.on_device(self.staging.upload(attn.arrays)), input_ids
        return self.model(ids, meta.positions, self.kv_caches, meta)

    def _draw(
        self,
        hidden: torch.Tensor,
        sampling: SamplingTensors,
        rows: np.ndarray,
        j: int,
        plan: StepPlan,
        spec: np.ndarray,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Proposal `j` of `rows` (of the speculating rows `spec`) from their hidden
        states: ids on every rank (rank 0 draws, the others receive it), and on rank
        0 the log-distribution each was drawn from."""
        if self.tp.rank != 0:
            ids = torch.empty(len(rows), dtype=torch.int64, device=self.device)
            return self.tp.broadcast_from_first(ids), None
        logits = self.model.compute_logits(hidden)
        add_bias(logits, position_bias(plan, spec[rows], self.device))
        sub = _at(sampling, to_device(rows, torch.int64, self.device), j)
        logq = sampling_logprobs(logits, sub)
        ids = gumbel_draw(logq, sub.seeds, sub.sample_index, _DRAFT)
        return self.tp.broadcast_from_first(ids), logq

    @torch.inference_mode()
    def propose(
        self,
        plan: StepPlan,
        input_ids: np.ndarray,
        tables: np.ndarray,
        proposed: np.ndarray,
    ) -> Drafts | None:
        """Runs the draft over the step (every row's tokens but the proposals'
        placeholders), then proposes `proposed[r]` tokens for each plan row r that
        speculates. None when none does."""
        layout = plan.layout
        query_lens = layout.query_lens - proposed
        spec = np.flatnonzero(proposed)
        ks = proposed[spec]
        placeholder = np.zeros(len(input_ids), dtype=bool)
        placeholder[concat_ranges(np.cumsum(layout.query_lens)[spec] - ks, ks)] = True
        hidden = self._forward(query_lens, layout.context_lens, tables, input_ids[~placeholder])
        if not len(spec):
            return None
        sampling = row_sampling(plan, spec, self.device)
        s, k_max, dev = len(spec), int(ks.max()), self.device
        tokens = torch.zeros((s, k_max), dtype=torch.int64, device=dev)
        logq = None
        seq_lens = layout.context_lens[spec] + query_lens[spec]  # tokens before proposal 0
        rows = np.arange(s)  # the speculating rows still proposing
        picked = hidden[to_device(np.cumsum(query_lens)[spec] - 1, torch.int64, dev)]
        for j in range(k_max):
            ids, q = self._draw(picked, sampling, rows, j, plan, spec)
            at = to_device(rows, torch.int64, dev)
            tokens[at, j] = ids
            if q is not None:
                if logq is None:
                    logq = torch.full((s, k_max, q.shape[-1]), float("-inf"), device=dev)
                logq[at, j] = q
            # Proposal j's KV (even the last one's: see the module's docstring), and the
            # hidden states that propose j + 1.
            hidden = self._forward(
                np.ones(len(rows), dtype=np.int64), seq_lens[rows] + j, tables[spec[rows]], ids
            )
            more = np.flatnonzero(ks[rows] > j + 1)
            if not len(more):
                break
            rows, picked = rows[more], hidden[to_device(more, torch.int64, dev)]
        (host,) = self.staging.download([tokens.to(torch.int32)])
        return Drafts(host, logq, ks)


@dataclass
class Verified:
    """The speculating rows' tokens (accepted proposals, then the target's own), row
    after row, `counts[s]` for row s; their reported logprobs and top-n."""

    tokens: np.ndarray
    logprobs: np.ndarray
    counts: np.ndarray
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


def verify(
    logits: torch.Tensor,
    sampling: SamplingTensors,
    drafts: Drafts,
    top_n: int,
    staging: HostStaging,
) -> Verified:
    """Rejection sampling of the drafts against the target's `logits` at each
    speculating row's k + 1 positions (row after row; position j predicts token j,
    so `sampling` holds each position's own sample index), bias already added."""
    dev = logits.device
    ks = drafts.ks
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
    u = hash_uniform(seeds ^ _ACCEPT, index, 1).squeeze(1)
    accepted = u * q_x <= p_x
    # After a rejection: from what p has more of than q (never empty there: q(x) > p(x)
    # somewhere means p > q elsewhere).
    residual = (logp[checks].exp() - logq.exp()).clamp(min=0).log()
    correction = torch.empty(len(logits), dtype=torch.int64, device=dev)
    correction[checks] = gumbel_draw(residual, seeds, index, _RESIDUAL)
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
    host = staging.download(wanted)
    accepted, correction, lp_x, lp_c = host[:4]
    proposals = drafts.tokens[mask]
    keep_x, keep_c, keep_pos, counts = [], [], [], np.empty(len(ks), dtype=np.int32)
    at = 0
    for s, k in enumerate(ks.tolist()):
        a = int(np.cumprod(accepted[at : at + k]).sum())
        keep_x.append(np.arange(at, at + a))
        keep_c.append(starts[s] + a)
        keep_pos.append(np.arange(starts[s], starts[s] + a + 1))
        counts[s] = a + 1
        at += k
    # Row s's tokens: its a accepted proposals, then the correction at position a.
    tok, lps = [], []
    for s, ix in enumerate(keep_x):
        tok += [proposals[ix], correction[keep_c[s] : keep_c[s] + 1]]
        lps += [lp_x[ix], lp_c[keep_c[s] : keep_c[s] + 1]]
    out = Verified(np.concatenate(tok).astype(np.int32), np.concatenate(lps), counts)
    if top_n:
        pos = np.concatenate(keep_pos)
        out.top_ids, out.top_logprobs = host[4][pos], host[5][pos]
    return out


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenated ranges [start, start + length)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(np.asarray(starts, dtype=np.int64), lengths) + within
