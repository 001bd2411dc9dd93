"""Token selection for a whole batch in one vectorised pass.

Randomness is counter-based: the noise for (request seed, token index, vocab
id) is a pure hash of those three numbers, so a seeded request draws the
same tokens whatever batch it shares, wherever it sits in it, and whether
its prompt was chunked or recomputed after preemption. No per-request
generator objects and no Python loop over requests.
"""

from __future__ import annotations

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


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    sample_index: torch.Tensor,
) -> torch.Tensor:
    """(int64 token ids [B], their float32 logprobs [B]); temperature 0 rows are greedy.

    The logprob is of the distribution after temperature and before top-k /
    top-p, as TGI reports it.
    """
    tokens = logits.argmax(dim=-1)
    rows = (temperature > 0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return tokens, _logprobs(logits, tokens)
    scaled = logits[rows] / temperature[rows, None]
    logits = logits.clone()
    logits[rows] = scaled
    k, p = top_k[rows], top_p[rows]
    if bool((k > 0).any()) or bool((p < 1).any()):
        scaled = apply_top_k_top_p(scaled, k, p)
    # Gumbel-max: argmax(logits/T + Gumbel noise) is a draw from softmax(logits/T).
    u = hash_uniform(seeds[rows], sample_index[rows], logits.shape[-1])
    gumbel = -torch.log(-torch.log(u))
    tokens[rows] = (scaled.double() + gumbel).argmax(dim=-1)
    return tokens, _logprobs(logits, tokens)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logits.log_softmax(dim=-1).gather(1, tokens[:, None]).squeeze(1).float()
