"""Green-list watermark (Kirchenbauer et al. 2023, "A Watermark for Large Language Models").

At each step the vocabulary is split by a hash of the previous token into a
green list (a `gamma` fraction of it) and the rest; `delta` is added to the
green logits before sampling, so watermarked text holds more green tokens than
chance. The detector re-derives each token's list from its predecessor and
counts: under no watermark the green count is Binomial(T, gamma), so its
z-score is large only for watermarked text. The split is a pure hash of
(previous token, candidate token) — the same counter-based hash the sampler
draws its randomness from — so no generator state and no per-row Python loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tgi_mp.executor.sampler import hash_uniform

# Keys the split so it is not the sampler's noise stream for the same numbers
# (15485863 is the hashing key of the paper's reference code).
_KEY = 15485863
_INDEX = -1  # a sample index no request uses


def green_mask(prev: torch.Tensor, cols: int | torch.Tensor, gamma: float) -> torch.Tensor:
    """bool [n, vocab] (or [n, k] for given candidate ids): which tokens are green after
    each of the `prev` tokens [n]."""
    prev = prev.to(torch.int64)
    index = torch.full_like(prev, _INDEX)
    return hash_uniform(prev * _KEY + 1, index, cols) < gamma


def apply_watermark(
    logits: torch.Tensor, prev: torch.Tensor, gamma: float, delta: float
) -> torch.Tensor:
    """`logits` [n, vocab] with `delta` added to each row's green tokens."""
    green = green_mask(prev, logits.shape[-1], gamma)
    return logits + green.to(logits.dtype) * delta


@dataclass(frozen=True)
class WatermarkScore:
    scored: int  # tokens scored (all but the first, which has no predecessor)
    green: int
    z: float

    def detected(self, threshold: float = 4.0) -> bool:
        return self.z > threshold


def score_ids(token_ids: Sequence[int], gamma: float = 0.5) -> WatermarkScore:
    """The watermark z-score of a token sequence."""
    ids = torch.tensor(list(token_ids), dtype=torch.int64)
    n = max(len(ids) - 1, 0)
    if n == 0:
        return WatermarkScore(0, 0, 0.0)
    green = int(green_mask(ids[:-1], ids[1:, None], gamma).sum())
    z = (green - gamma * n) / math.sqrt(n * gamma * (1 - gamma))
    return WatermarkScore(n, green, z)


def score_text(text: str, tokenizer: object, gamma: float = 0.5) -> WatermarkScore:
    """The watermark z-score of a text, tokenized without special tokens by a `tokenizers`
    Tokenizer or a transformers tokenizer."""
    enc = tokenizer.encode(text, add_special_tokens=False)
    return score_ids(enc.ids if hasattr(enc, "ids") else enc, gamma)
