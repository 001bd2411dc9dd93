"""Speculative decoding's draft model (`--speculative-model`), in the executor.

The draft runs beside the target with its own KV cache in the target's block ids:
the scheduler's block tables serve both. Each step it first computes every
token the target computes, minus the proposals' placeholders (so its cache never
falls behind), then proposes each speculating row's k tokens one batched decode
at a time and computes the last one's KV too: whatever the target accepts, the
draft's cache is then valid wherever the target's is. The target checks the
proposals in its own forward (`executor/verification.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tgi_mp.config import EngineConfig
from tgi_mp.executor.logits import add_bias, concat_ranges, position_bias, row_sampling, to_device
from tgi_mp.executor.parallel import TensorParallel
from tgi_mp.executor.sampler import (
    DRAFT_STREAM,
    SamplingTensors,
    gumbel_draw,
    sampling_logprobs,
    select_rows,
)
from tgi_mp.executor.staging import HostStaging
from tgi_mp.ipc.messages import StepPlan
from tgi_mp.kernels.attention import AttentionInputs, allocate_kv_cache
from tgi_mp.kernels.backends import AttentionBackend


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
        sub = select_rows(sampling, to_device(rows, torch.int64, self.device), j)
        logq = sampling_logprobs(logits, sub)
        ids = gumbel_draw(logq, sub.seeds, sub.sample_index, DRAFT_STREAM)
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
