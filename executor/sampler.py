"""Token selection for a whole batch in one vectorised pass.

Randomness is counter-based: the noise for (request seed, token index, vocab
id) is a pure hash of those three numbers, so a seeded request draws the
same tokens whatever batch it shares, wherever it sits in it, and whether
its prompt was chunked or recomputed after preemption. No per-request
generator objects and no Python loop over requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_U64 = 1 << 64


def _i64(c: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 math)."""
    return c - _U64 if c >= 1 << 63 else c


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)
_STREAM = _i64(0xD1B54A32D192ED03)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    x = x ^ _shr(x, 30)
    x = x * _MIX1
    x = x ^ _shr(x, 27)
    x = x * _MIX2
    return x ^ _shr(x, 31)


def hash_uniform(
    seeds: torch.Tensor, index: torch.Tensor, cols: int | torch.Tensor
) -> torch.Tensor:
    """float64 uniforms in (0, 1), a pure function of (seed, index, vocabulary id).

    `cols` is the vocabulary size (all ids) or the ids themselves, [n] or [B, n]:
    the value for a given id is the same whichever ids are asked for.
    """
    row = _splitmix64(seeds * _GOLDEN + index.to(torch.int64) * _STREAM)
    if isinstance(cols, int):
        cols = torch.arange(cols, dtype=torch.int64, device=seeds.device)
    cols = cols.to(torch.int64)
    bits = _splitmix64(row[:, None] + (cols if cols.dim() == 2 else cols[None, :]) * _GOLDEN)
    return (_shr(bits, 11).to(torch.float64) + 0.5) * (1.0 / (1 << 53))


_TOP_P_WINDOW = 1024  # top-p-only rows look at this many best tokens before a full sort


def top_candidates(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens top-k (0 = off) and top-p (1 = off) may keep, per row: (logits sorted
    descending, -inf where dropped; their ids), [B, n].

    A full sort of a large vocabulary costs ~50x a top-k, so only a window of the
    best tokens is sorted: `max(top_k)` of them, or `_TOP_P_WINDOW` for rows with
    top-p alone, falling back to every token when the window holds less than a
    row's top-p mass.
    """
    vocab = logits.shape[-1]
    max_k = int(top_k.max())
    n = max_k if bool((top_k > 0).all()) else max(max_k, _TOP_P_WINDOW)
    for width in (min(n, vocab), vocab):
        vals, ids = logits.topk(width, dim=-1)
        rank = torch.arange(width, device=logits.device)[None, :]
        has_k = top_k[:, None] > 0
        drop = has_k & (rank >= top_k[:, None])
        # Top-p renormalises over the top-k survivors (HF's order), else the vocabulary.
        kept = vals.masked_fill(drop, float("-inf")).logsumexp(-1, keepdim=True)
        norm = torch.where(has_k, kept, logits.logsumexp(-1, keepdim=True))
        probs = (vals - norm).exp().masked_fill(drop, 0.0)
        short = (~has_k[:, 0]) & (probs.sum(-1) < top_p)
        if width == vocab or not bool(short.any()):
            break
    # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass
    # before it already does. The first token is always kept.
    drop |= probs.cumsum(dim=-1) - probs >= top_p[:, None]
    drop[:, 0] = False
    return vals.masked_fill(drop, float("-inf")), ids


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """`logits` with what top-k / top-p exclude set to -inf (full width)."""
    vals, ids = top_candidates(logits, top_k, top_p)
    return torch.full_like(logits, float("-inf")).scatter(-1, ids, vals)


def apply_typical_p(logits: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2022; HF's TypicalLogitsWarper): keep the
    tokens whose surprise is closest to the entropy, up to `typical_p` of the mass."""
    logp = logits.log_softmax(dim=-1)
    probs = logp.exp()
    entropy = -(probs * logp.nan_to_num(neginf=0.0)).sum(dim=-1, keepdim=True)
    distance = (-logp - entropy).abs()
    sorted_distance, order = distance.sort(dim=-1)
    mass = probs.gather(-1, order).cumsum(dim=-1)
    # The cut: the first sorted position where the mass reaches typical_p (kept).
    last = (mass < typical_p[:, None]).sum(dim=-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
    drop_sorted = sorted_distance > sorted_distance.gather(-1, last)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens less likely than `min_p` times the most likely one."""
    logp = logits.log_softmax(dim=-1)
    floor = logp.max(dim=-1, keepdim=True).values + torch.log(min_p[:, None])
    return logits.masked_fill(logp < floor, float("-inf"))


@dataclass
class SamplingTensors:
    """Per-row sampling columns of one step, as tensors on the device."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_k: torch.Tensor  # int64; 0 = off
    top_p: torch.Tensor  # float32; 1 = off
    typical_p: torch.Tensor  # float32; 1 = off
    min_p: torch.Tensor  # float32; 0 = off
    seeds: torch.Tensor  # int64
    sample_index: torch.Tensor  # int64: tokens generated before, keys the random stream


def sample(
    logits: torch.Tensor, t: SamplingTensors, top_n: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Token ids [B] and their logprobs [B]; with `top_n`, the n most likely ids and
    logprobs [B, n] too. Rows with temperature 0 are greedy.

    Logprobs are of the distribution after temperature and before top-k / top-p /
    typical-p / min-p, as TGI reports them.
    """
    tokens = logits.argmax(dim=-1)
    rows = (t.temperature > 0).nonzero().squeeze(1)
    if rows.numel():
        # Capped: +inf would turn the softmax into NaNs (-inf stays: it excludes a token).
        top = torch.finfo(logits.dtype).max
        scaled = (logits[rows] / t.temperature[rows, None]).clamp(max=top)
        logits = logits.clone()
        logits[rows] = scaled
        tokens[rows] = _draw(scaled, select_rows(t, rows))
    logp = logits.log_softmax(dim=-1)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1).float()
    if top_n <= 0:
        return tokens, chosen, None, None
    top = logp.topk(top_n, dim=-1)
    return tokens, chosen, top.indices, top.values.float()


def select_rows(
    t: SamplingTensors, rows: torch.Tensor, offset: torch.Tensor | int = 0
) -> SamplingTensors:
    """Rows of `t` (repeats allowed), their sample index moved on by `offset`."""
    cols = {name: col[rows] for name, col in vars(t).items()}
    if not isinstance(offset, int) or offset:
        cols["sample_index"] = cols["sample_index"] + offset
    return SamplingTensors(**cols)


def _typical_and_min_p(
    scaled: torch.Tensor, typical_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """The filters every row of a batch runs when any row asks (1 and 0: off)."""
    if bool((typical_p < 1).any()):
        scaled = apply_typical_p(scaled, typical_p)
    if bool((min_p > 0).any()):
        scaled = apply_min_p(scaled, min_p)
    return scaled


def _draw(scaled: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """One token per row from softmax(scaled) after the row's truncations.

    Gumbel-max: argmax(logits + Gumbel noise) is a draw from softmax(logits). Rows
    that truncate (top-k / top-p) and rows that do not are drawn as two groups,
    so only the first pays for finding its candidates.
    """
    scaled = _typical_and_min_p(scaled, t.typical_p, t.min_p)
    out = torch.empty(scaled.shape[0], dtype=torch.int64, device=scaled.device)
    truncated = (t.top_k > 0) | (t.top_p < 1)
    for group in (truncated.nonzero().squeeze(1), (~truncated).nonzero().squeeze(1)):
        if group.numel() == 0:
            continue
        g = select_rows(t, group)
        if bool(truncated[group[0]]):
            vals, ids = top_candidates(scaled[group], g.top_k, g.top_p)
        else:
            vals, ids = scaled[group], None
        choice = gumbel_draw(vals, g.seeds, g.sample_index, ids=ids)
        out[group] = choice if ids is None else ids.gather(1, choice[:, None]).squeeze(1)
    return out


# Independent random streams of one (seed, token index), for speculative decoding's
# draws (`executor/verification.py`); plain sampling's stream is 0.
DRAFT_STREAM = _i64(0x8CB92BA72F3D8DD7)
ACCEPT_STREAM = _i64(0x4F1BBCDCBFA53E0B)
RESIDUAL_STREAM = _i64(0x2545F4914F6CDD1D)


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
    scaled = _typical_and_min_p(scaled, t.typical_p[rows], t.min_p[rows])
    top_k, top_p = t.top_k[rows], t.top_p[rows]
    cut = ((top_k > 0) | (top_p < 1)).nonzero().squeeze(1)
    if cut.numel():  # as plain sampling: only the rows that truncate are truncated
        scaled[cut] = apply_top_k_top_p(scaled[cut], top_k[cut], top_p[cut])
    out[rows] = scaled.float().log_softmax(dim=-1)
    return out


def gumbel_draw(
    logp: torch.Tensor,
    seeds: torch.Tensor,
    index: torch.Tensor,
    stream: int = 0,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """One column per row from exp(logp) (unnormalised is fine), Gumbel-max with the
    counter-based noise of (seed ^ stream, index) at each column's vocabulary id
    (`ids` [B, n] when the columns are a subset): int64 [B]."""
    u = hash_uniform(seeds ^ stream, index, ids if ids is not None else logp.shape[-1])
    return (logp.double() - torch.log(-torch.log(u))).argmax(dim=-1)


def reported_logprobs(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """What TGI reports: log-softmax after temperature, before any truncation."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    top = torch.finfo(logits.dtype).max
    return (logits / t[:, None]).clamp(max=top).float().log_softmax(dim=-1)
