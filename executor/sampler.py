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


def hash_uniform(seeds: torch.Tensor, index: torch.Tensor, vocab: int) -> torch.Tensor:
    """float64 uniforms in (0, 1), shape [B, vocab], a pure function of the inputs."""
    row = _splitmix64(seeds * _GOLDEN + index.to(torch.int64) * _STREAM)
    cols = torch.arange(vocab, dtype=torch.int64, device=seeds.device)
    bits = _splitmix64(row[:, None] + cols[None, :] * _GOLDEN)
    return (_shr(bits, 11).to(torch.float64) + 0.5) * (1.0 / (1 << 53))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Masks to -inf what top-k (0 = off) and top-p (1 = off) exclude, per row."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])[:, None]
    drop = rank >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: drop a token when the
    # mass before it already does. The first token is always kept.
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


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
        scaled = logits[rows] / t.temperature[rows, None]
        logits = logits.clone()
        logits[rows] = scaled
        k, p, typ, mp = t.top_k[rows], t.top_p[rows], t.typical_p[rows], t.min_p[rows]
        if bool((k > 0).any()) or bool((p < 1).any()):
            scaled = apply_top_k_top_p(scaled, k, p)
        if bool((typ < 1).any()):
            scaled = apply_typical_p(scaled, typ)
        if bool((mp > 0).any()):
            scaled = apply_min_p(scaled, mp)
        # Gumbel-max: argmax(logits/T + Gumbel noise) is a draw from softmax(logits/T).
        u = hash_uniform(t.seeds[rows], t.sample_index[rows], logits.shape[-1])
        tokens[rows] = (scaled.double() - torch.log(-torch.log(u))).argmax(dim=-1)
    logp = logits.log_softmax(dim=-1)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1).float()
    if top_n <= 0:
        return tokens, chosen, None, None
    top = logp.topk(top_n, dim=-1)
    return tokens, chosen, top.indices, top.values.float()
