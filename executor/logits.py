"""From a step's logits to its tokens, in one order for every step:

logit bias -> penalties -> watermark -> grammar masks (constrained rows) ->
sampling -> logprobs and top-n alternatives (of the constrained distribution).

`LogitsPipeline` runs it over `RowInputs` (the sampled rows' columns, on the
device). The real step builds them from its plan; the memory-profiling step
builds the costliest ones a step may have, and runs the same code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from tgi_mp.executor.penalties import PenaltyHistory, apply_penalties
from tgi_mp.executor.sampler import SamplingTensors, sample
from tgi_mp.executor.watermark import apply_watermark
from tgi_mp.ipc.messages import StepPlan
from tgi_mp.kernels.cpu_build import KernelUnavailable
from tgi_mp.kernels.cpu_logits import CpuLogits

log = logging.getLogger("tgi_mp.executor")

# A grammar-banned token's logit offset: finite (0 * -inf would be NaN), and far below
# any logit, so its probability is exactly 0.
BANNED = 1e30


def to_device(a: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Plan arrays are read-only views of ZeroMQ frames; torch wants writable memory.
    return torch.from_numpy(np.array(a)).to(device=device, dtype=dtype)


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


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenated ranges [start, start + length)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(np.asarray(starts, dtype=np.int64), lengths) + within


@dataclass
class Penalised:
    """The rows that use a penalty: their positions among the sampled rows, their rows of
    the history tables, and their three penalties."""

    rows: torch.Tensor  # int64 [P]
    table_rows: torch.Tensor  # int64 [P]
    repetition: torch.Tensor  # float32 [P]
    frequency: torch.Tensor
    presence: torch.Tensor


@dataclass
class RowInputs:
    """What the pipeline needs for a step's sampled rows, on the device."""

    sampling: SamplingTensors
    top_n: int  # alternatives to compute (the most any row asked for)
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # row, id, value
    penalised: Penalised | None = None
    watermarked: tuple[torch.Tensor, torch.Tensor] | None = None  # rows, their previous token
    allowed: tuple[torch.Tensor, np.ndarray] | None = None  # rows, their grammar bitmask


class LogitsPipeline:
    def __init__(
        self, vocab: int, device: torch.device, watermark_gamma: float, watermark_delta: float
    ) -> None:
        self.device = device
        self.history = PenaltyHistory(vocab, device)
        self.watermark_gamma = watermark_gamma
        self.watermark_delta = watermark_delta
        self._bits = torch.arange(32, dtype=torch.int32, device=device)
        self._cpu = _cpu_kernels() if device.type == "cpu" else None

    def __call__(
        self, logits: torch.Tensor, inputs: RowInputs
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Token ids and their logprobs, and the top-n (ids, logprobs) when asked."""
        add_bias(logits, inputs.bias)
        if (p := inputs.penalised) is not None:
            logits[p.rows] = apply_penalties(
                logits[p.rows],
                self.history.seen[p.table_rows],
                self.history.counts[p.table_rows],
                p.repetition,
                p.frequency,
                p.presence,
            )
        if inputs.watermarked is not None:
            rows, prev = inputs.watermarked
            logits[rows] = apply_watermark(
                logits[rows], prev, self.watermark_gamma, self.watermark_delta
            )
        if inputs.allowed is not None:  # last: what is sampled and reported is constrained
            self.apply_grammar(logits, *inputs.allowed)
        if self._cpu is not None and inputs.top_n <= 0 and not inputs.sampling.temperature.any():
            return (*self._cpu.greedy(logits), None, None)  # all greedy: one read of the rows
        return sample(logits, inputs.sampling, inputs.top_n)

    def apply_grammar(self, logits: torch.Tensor, rows: torch.Tensor, bitmask: np.ndarray) -> None:
        """Bans, in place, the tokens each constrained row's bitmask (int32 [G, W], bit t:
        token t allowed) does not allow: by the C++ kernel on the CPU, else by a bias."""
        if self._cpu is not None:
            self._cpu.mask(logits, rows, bitmask)
        else:
            logits.index_add_(0, rows, self.grammar_bias(bitmask)[:, : logits.shape[1]])

    def grammar_bias(self, bitmask: np.ndarray) -> torch.Tensor:
        """A grammar bitmask (int32 [G, W], bit t: token t allowed) as float32 [G, W * 32]
        logit offsets: 0 where allowed, -1e30 where not (exp gives exactly 0; an add is
        ~10x faster on the CPU than a masked fill)."""
        if self.device.type == "cpu":  # numpy unpacks bits ~10x faster than torch's shifts
            words = np.ascontiguousarray(bitmask).view(np.uint8)
            allowed = torch.from_numpy(np.unpackbits(words, axis=1, bitorder="little"))
        else:
            words = to_device(bitmask, torch.int32, self.device)
            allowed = ((words[:, :, None] >> self._bits) & 1).view(len(bitmask), -1)
        return allowed.to(torch.float32).sub_(1.0).mul_(BANNED)

    # ------------------------------------------------------------ the step's inputs

    def inputs_from_plan(
        self,
        plan: StepPlan,
        rows: np.ndarray,
        sampling: SamplingTensors,
        history_rows: torch.Tensor | None,
    ) -> RowInputs:
        """The sampled rows' (`rows` of the plan) inputs; `history_rows`: each plan row's
        penalty table row (from `history.update`), or None."""
        s, dev = plan.sampling, self.device
        inputs = RowInputs(sampling, int(s.top_n.max()))
        inputs.bias = position_bias(plan, rows, dev)
        if history_rows is not None:
            table_rows = history_rows[to_device(rows, torch.int64, dev)]
            sel = (table_rows >= 0).nonzero().squeeze(1)
            if sel.numel():
                picked = rows[sel.cpu().numpy()]
                pen = plan.penalties
                inputs.penalised = Penalised(
                    sel,
                    table_rows[sel],
                    to_device(pen.repetition[picked], torch.float32, dev),
                    to_device(pen.frequency[picked], torch.float32, dev),
                    to_device(pen.presence[picked], torch.float32, dev),
                )
        marked = np.flatnonzero(s.watermark[rows])
        if len(marked):
            layout = plan.layout
            last_token = (np.cumsum(layout.query_lens) - 1)[rows[marked]]
            inputs.watermarked = (
                to_device(marked, torch.int64, dev),
                to_device(layout.input_ids[last_token], torch.int64, dev),
            )
        return inputs

    def costliest_inputs(self, n: int) -> RowInputs:
        """The most expensive inputs `n` rows can have: every row biased, penalised
        (the history tables grown to `n` rows, kept: their memory is budgeted) and
        watermarked, every filter on, and a flat distribution, so that top-p takes its
        full-vocabulary path."""
        dev = self.device

        def full(value: float, dtype: torch.dtype) -> torch.Tensor:
            return torch.full((n,), value, dtype=dtype, device=dev)

        self.history.grow_to(n)
        rows = torch.arange(n, device=dev)
        return RowInputs(
            sampling=SamplingTensors(
                temperature=full(1e4, torch.float32),
                top_k=full(0, torch.int64),
                top_p=full(0.999, torch.float32),
                typical_p=full(0.95, torch.float32),
                min_p=full(0.01, torch.float32),
                seeds=full(0, torch.int64),
                sample_index=full(0, torch.int64),
            ),
            top_n=5,
            bias=(rows, rows, full(1.0, torch.float32)),
            penalised=Penalised(
                rows,
                rows,
                full(1.1, torch.float32),
                full(0.1, torch.float32),
                full(0.1, torch.float32),
            ),
            watermarked=(rows, rows),
        )


def _cpu_kernels() -> CpuLogits | None:
    """The CPU's logits kernels, or None (no C++ compiler: torch's ops)."""
    try:
        return CpuLogits(BANNED)
    except KernelUnavailable as e:
        log.warning("logits by torch's ops alone: %s", e)
        return None
