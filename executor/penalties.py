"""Token histories for repetition / frequency / presence penalties.

Only sequences that use a penalty get a row in two pooled tables: `seen`
(prompt and generated tokens, for the repetition penalty) and `counts`
(generated tokens only, for frequency and presence). Rows are filled from the
tokens each plan computes, so they follow preemption and chunking for free: a
sequence computed from context 0 starts a fresh row.
"""

from __future__ import annotations

import numpy as np
import torch

from tgi_mp.ipc.messages import BatchLayout, PenaltyColumns


class PenaltyHistory:
    def __init__(self, vocab: int, device: torch.device) -> None:
        self.vocab = vocab
        self.device = device
        self.rows: dict[int, int] = {}  # seq id -> row
        self.free: list[int] = []
        self.seen = torch.zeros(0, vocab, dtype=torch.bool, device=device)
        self.counts = torch.zeros(0, vocab, dtype=torch.int32, device=device)

    def _row(self, seq_id: int) -> int:
        row = self.rows.get(seq_id)
        if row is None:
            if not self.free:
                self._grow()
            row = self.rows[seq_id] = self.free.pop()
        return row

    def _grow(self) -> None:
        """Doubles the tables (at least 8 rows); the new rows are free."""
        n = self.seen.shape[0]
        grow = max(n, 8)
        self.seen = torch.cat([self.seen, self.seen.new_zeros(grow, self.vocab)])
        self.counts = torch.cat([self.counts, self.counts.new_zeros(grow, self.vocab)])
        self.free = list(range(n + grow - 1, n - 1, -1)) + self.free

    def grow_to(self, rows: int) -> None:
        """Room for `rows` sequences, grown as sequences would grow it (the GPU memory
        profile uses this: the tables persist across steps)."""
        while self.seen.shape[0] < rows:
            self._grow()

    def update(self, pen: PenaltyColumns, layout: BatchLayout) -> torch.Tensor | None:
        """Records this step's input tokens; returns each plan row's table row (-1: none),
        or None when no sequence in the step uses a penalty."""
        for seq_id in pen.released.tolist():
            if (row := self.rows.pop(seq_id, None)) is not None:
                self.free.append(row)
        active = (pen.repetition != 1.0) | (pen.frequency != 0.0) | (pen.presence != 0.0)
        if not active.any():
            return None
        rows = np.full(len(active), -1, dtype=np.int64)
        for i in np.flatnonzero(active).tolist():
            rows[i] = self._row(int(pen.seq_ids[i]))
        # A sequence starts over at context 0, or on a cached prefix it is sent.
        fresh = rows[active & ((layout.context_lens == 0) | (pen.history_counts > 0))]
        if len(fresh):
            self.seen[fresh] = False
            self.counts[fresh] = 0
        # Every token of an active row (its history, then this step's), and its position.
        hist_rows, hist_pos = _spans(rows, np.zeros_like(layout.context_lens), pen.history_counts)
        step_rows, step_pos = _spans(rows, layout.context_lens, layout.query_lens)
        token_rows = np.concatenate([hist_rows, step_rows])
        positions = np.concatenate([hist_pos, step_pos])
        ids = np.concatenate([pen.history_ids, layout.input_ids])
        prompt_lens = np.concatenate(
            [
                np.repeat(pen.prompt_lens, pen.history_counts),
                np.repeat(pen.prompt_lens, layout.query_lens),
            ]
        )
        keep = token_rows >= 0
        r = torch.from_numpy(token_rows[keep]).to(self.device)
        tok = torch.from_numpy(ids[keep].astype(np.int64)).to(self.device)
        self.seen[r, tok] = True
        generated = torch.from_numpy(positions[keep] >= prompt_lens[keep]).to(self.device)
        self.counts.index_put_(
            (r[generated], tok[generated]),
            torch.ones(int(generated.sum()), dtype=torch.int32, device=self.device),
            accumulate=True,
        )
        return torch.from_numpy(rows).to(self.device)


def _spans(
    rows: np.ndarray, starts: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Row i's `lengths[i]` tokens at positions starts[i].. : (row per token, position)."""
    token_rows = np.repeat(rows, lengths)
    offsets = np.arange(len(token_rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return token_rows, np.repeat(starts, lengths) + offsets


def apply_penalties(
    logits: torch.Tensor,
    seen: torch.Tensor,
    counts: torch.Tensor,
    repetition: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
) -> torch.Tensor:
    """HF's repetition penalty (seen tokens: positive logits divided, negative multiplied),
    then OpenAI's frequency and presence penalties over generated-token counts."""
    rep = repetition[:, None]
    # A tiny penalty may divide a logit past the dtype's range: cap it, never infinity.
    top = torch.finfo(logits.dtype).max
    penalised = torch.where(logits > 0, (logits / rep).clamp(max=top), logits * rep)
    logits = torch.where(seen, penalised, logits)
    c = counts.to(logits.dtype)
    return logits - frequency[:, None] * c - presence[:, None] * (c > 0).to(logits.dtype)
