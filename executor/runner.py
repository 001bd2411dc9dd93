"""One executor's model, KV cache and step: plan in, sampled token ids out."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from tgi_mp.config import EngineConfig
from tgi_mp.executor.parallel import join
from tgi_mp.executor.penalties import PenaltyHistory, apply_penalties
from tgi_mp.executor.sampler import SamplingTensors, sample
from tgi_mp.executor.watermark import apply_watermark
from tgi_mp.executor.weights import load_model
from tgi_mp.ipc.messages import StepPlan
from tgi_mp.kernels.attention import AttentionMetadata, allocate_kv_cache

log = logging.getLogger("tgi_mp.executor")


@dataclass
class StepOutput:
    tokens: np.ndarray  # int32 [sampled rows]
    logprobs: np.ndarray  # float32 [sampled rows]
    top_ids: np.ndarray | None = None  # int32 [sampled rows, max top_n]
    top_logprobs: np.ndarray | None = None
    prompt_logprobs: np.ndarray | None = None  # float32 [sum(plan.prompt_logprobs)]


# Prompt positions scored per LM-head call: bounds the [positions, vocab] logits.
_PROMPT_LOGPROB_CHUNK = 256


def kv_bytes_per_block(cfg: EngineConfig) -> int:
    """One block's K and V over all layers, on one executor (its share of the KV heads)."""
    mc = cfg.model_config
    elem = torch.empty((), dtype=getattr(torch, cfg.dtype)).element_size()
    heads = mc.num_kv_heads // cfg.num_shards
    return 2 * mc.num_layers * cfg.block_size * heads * mc.head_dim * elem


def available_memory() -> int:
    """Bytes the kernel could give this process now without swapping (Linux's
    MemAvailable; free physical pages elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_budget(cfg: EngineConfig) -> tuple[int, str]:
    """KV cache bytes for this executor, and how they were decided (for the log)."""
    if cfg.kv_cache_memory is not None:
        return cfg.kv_cache_memory, "--kv-cache-memory"
    free = available_memory()
    budget = int(free * cfg.kv_cache_fraction)
    return (
        budget,
        f"{cfg.kv_cache_fraction:g} of {free / 2**30:.1f} GiB available after the weights",
    )


def num_kv_blocks(cfg: EngineConfig) -> tuple[int, str]:
    """KV capacity in blocks: `max_batch_total_tokens` when given, else the memory budget."""
    if cfg.max_batch_total_tokens is not None:
        return -(-cfg.max_batch_total_tokens // cfg.block_size), "--max-batch-total-tokens"
    budget, why = kv_budget(cfg)
    return max(1, budget // kv_bytes_per_block(cfg)), f"{budget / 2**30:.2f} GiB = {why}"


def _tensor(a: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Plan arrays are read-only views of ZeroMQ frames; torch wants writable memory.
    return torch.from_numpy(np.array(a)).to(device=device, dtype=dtype)


class ModelRunner:
    def __init__(self, cfg: EngineConfig, rank: int) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.dtype = getattr(torch, cfg.dtype)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        elif cfg.num_shards > 1:  # the ranks share the machine's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.num_shards))
        t0 = time.perf_counter()
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.perf_counter()
            if done == total or now - last[0] > 2.0:
                last[0] = now
                log.info("loading weights: %d/%d tensors", done, total)

        self.tp = join(rank, cfg.num_shards, cfg.ipc_root, cfg.device)
        self.model = load_model(
            cfg.model,
            cfg.model_config,
            self.dtype,
            self.device,
            progress,
            self.tp,
            dummy=cfg.load_format == "dummy",
        )
        self.penalties = PenaltyHistory(cfg.model_config.vocab_size, self.device)
        self.num_blocks, why = num_kv_blocks(cfg)
        mc = cfg.model_config
        self.kv_caches = allocate_kv_cache(
            mc.num_layers,
            self.num_blocks,
            cfg.block_size,
            mc.num_kv_heads // cfg.num_shards,
            mc.head_dim,
            self.dtype,
            self.device,
        )
        log.info(
            "rank %d: %s loaded in %.1fs (%s, %s); KV cache %d blocks x %d tokens = %d tokens (%s)",
            rank,
            cfg.model.model_id,
            time.perf_counter() - t0,
            cfg.dtype,
            cfg.device,
            self.num_blocks,
            cfg.block_size,
            self.num_blocks * cfg.block_size,
            why,
        )

    def _penalise(
        self, logits: torch.Tensor, plan: StepPlan, rows: np.ndarray, history_rows: torch.Tensor
    ) -> None:
        """Applies penalties in place to the sampled rows that use them."""
        table_rows = history_rows[_tensor(rows, torch.int64, self.device)]
        sel = (table_rows >= 0).nonzero().squeeze(1)
        if sel.numel() == 0:
            return
        picked = rows[sel.cpu().numpy()]
        t = table_rows[sel]
        logits[sel] = apply_penalties(
            logits[sel],
            self.penalties.seen[t],
            self.penalties.counts[t],
            _tensor(plan.repetition_penalty[picked], torch.float32, self.device),
            _tensor(plan.frequency_penalty[picked], torch.float32, self.device),
            _tensor(plan.presence_penalty[picked], torch.float32, self.device),
        )

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> StepOutput:
        """Sampled token ids and logprobs (and top-n alternatives), one per sampled row."""
        counts = plan.block_counts
        tables = np.zeros((len(counts), int(counts.max())), dtype=np.int32)
        tables[np.arange(tables.shape[1])[None, :] < counts[:, None]] = plan.block_tables
        meta = AttentionMetadata.build(
            plan.query_lens, plan.context_lens, tables, self.cfg.block_size, self.device
        )
        input_ids = _tensor(plan.input_ids, torch.int64, self.device)
        hidden = self.model(input_ids, meta.positions, self.kv_caches, meta)
        if self.tp.rank != 0:  # rank 0 alone computes logits and samples
            return StepOutput(np.empty(0, dtype=np.int32), np.empty(0, dtype=np.float32))
        history_rows = self.penalties.update(plan)  # every step: chunks feed the history too
        prompt_logprobs = (
            self._prompt_logprobs(hidden, plan) if plan.prompt_logprobs.any() else None
        )

        rows = np.flatnonzero(plan.sample)
        if len(rows) == 0:
            empty = np.empty(0, dtype=np.int32), np.empty(0, dtype=np.float32)
            return StepOutput(*empty, prompt_logprobs=prompt_logprobs)
        last_token = (np.cumsum(plan.query_lens) - 1)[rows]
        logits = self.model.compute_logits(hidden[_tensor(last_token, torch.int64, self.device)])
        if len(plan.bias_ids):
            self._bias(logits, plan)
        if history_rows is not None:
            self._penalise(logits, plan, rows, history_rows)
        marked = np.flatnonzero(plan.watermark[rows])
        if len(marked):
            sel = _tensor(marked, torch.int64, self.device)
            prev = _tensor(plan.input_ids[last_token[marked]], torch.int64, self.device)
            logits[sel] = apply_watermark(
                logits[sel], prev, self.cfg.watermark_gamma, self.cfg.watermark_delta
            )
        columns = SamplingTensors(
            temperature=_tensor(plan.temperature[rows], torch.float32, self.device),
            top_k=_tensor(plan.top_k[rows], torch.int64, self.device),
            top_p=_tensor(plan.top_p[rows], torch.float32, self.device),
            typical_p=_tensor(plan.typical_p[rows], torch.float32, self.device),
            min_p=_tensor(plan.min_p[rows], torch.float32, self.device),
            seeds=_tensor(plan.seeds[rows], torch.int64, self.device),
            sample_index=_tensor(plan.sample_index[rows], torch.int64, self.device),
        )
        tokens, logprobs, top_ids, top_lps = sample(logits, columns, int(plan.top_n.max()))
        out = StepOutput(tokens.to(torch.int32).cpu().numpy(), logprobs.cpu().numpy())
        out.prompt_logprobs = prompt_logprobs
        if top_ids is not None:
            out.top_ids = top_ids.to(torch.int32).cpu().numpy()
            out.top_logprobs = top_lps.cpu().numpy()
        return out

    def _bias(self, logits: torch.Tensor, plan: StepPlan) -> None:
        """Adds each sampled row's logit biases in place, in one scatter."""
        owner = np.repeat(np.arange(len(plan.bias_counts)), plan.bias_counts)
        keep = plan.sample[owner]
        logit_row = (np.cumsum(plan.sample) - 1)[owner[keep]]
        index = (
            _tensor(logit_row, torch.int64, self.device),
            _tensor(plan.bias_ids[keep], torch.int64, self.device),
        )
        values = _tensor(plan.bias_values[keep], logits.dtype, self.device)
        logits.index_put_(index, values, accumulate=True)

    def _prompt_logprobs(self, hidden: torch.Tensor, plan: StepPlan) -> np.ndarray:
        """Logprob of each next prompt token, from the raw logits (no temperature or
        penalty, as TGI's prefill details), for the rows that asked."""
        starts = np.cumsum(plan.query_lens) - plan.query_lens
        counts = plan.prompt_logprobs
        positions = np.concatenate(
            [np.arange(s, s + c) for s, c in zip(starts, counts, strict=True) if c]
        )
        targets = _tensor(plan.prompt_targets, torch.int64, self.device)
        out = torch.empty(len(positions), dtype=torch.float32, device=self.device)
        for i in range(0, len(positions), _PROMPT_LOGPROB_CHUNK):
            pos = _tensor(positions[i : i + _PROMPT_LOGPROB_CHUNK], torch.int64, self.device)
            logp = self.model.compute_logits(hidden[pos]).float().log_softmax(dim=-1)
            out[i : i + len(pos)] = logp.gather(1, targets[i : i + len(pos), None]).squeeze(1)
        return out.cpu().numpy()
