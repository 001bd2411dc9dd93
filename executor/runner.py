"""One executor's model, KV cache and step: plan in, sampled token ids out."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import numpy as np
import torch

from tgi_mp.config import EngineConfig
from tgi_mp.executor.cuda_graphs import DecodeGraphs
from tgi_mp.executor.device import (
    available_host_memory,
    profile_cuda_budget,
    resolve_device,
    resolve_dtype,
)
from tgi_mp.executor.drafting import DraftModel
from tgi_mp.executor.logits import LogitsPipeline, to_device
from tgi_mp.executor.lora import LoraAdapters
from tgi_mp.executor.parallel import join
from tgi_mp.executor.sampler import SamplingTensors
from tgi_mp.executor.staging import HostStaging
from tgi_mp.executor.verification import (
    accept_drafts,
    accept_ngram,
    check_drafts,
    draft_positions,
    fill_drafts,
    merge_verified,
    ngram_draws,
)
from tgi_mp.executor.weights import load_model
from tgi_mp.ipc.messages import StepPlan
from tgi_mp.kernels.attention import AttentionInputs, allocate_kv_cache
from tgi_mp.kernels.backends import AttentionBackend, select_backend

log = logging.getLogger("tgi_mp.executor")


@dataclass
class StepOutput:
    tokens: np.ndarray  # int32 [sampled rows]
    logprobs: np.ndarray  # float32 [sampled rows]
    top_ids: np.ndarray | None = None  # int32 [sampled rows, max top_n]
    top_logprobs: np.ndarray | None = None
    prompt_logprobs: np.ndarray | None = None  # float32 [sum(plan.prompt_logprobs)]
    # With plan.prompt_logprobs.top_k > -1: ranks [n], top ids and logprobs [n, k].
    prompt_tops: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    # With proposals verified: tokens per sampled row (the arrays hold them row after
    # row); None: one each.
    counts: np.ndarray | None = None

    def last_tokens(self) -> np.ndarray:
        """Each sampled row's last token."""
        if self.counts is None:
            return self.tokens
        return self.tokens[np.cumsum(self.counts) - 1]


# Prompt positions scored per LM-head call: bounds the [positions, vocab] logits.
_PROMPT_LOGPROB_CHUNK = 256


def kv_bytes_per_block(cfg: EngineConfig, dtype: torch.dtype) -> int:
    """One block's K and V over all layers, on one executor (its share of the KV heads),
    the draft model's included."""
    total = 0
    for mc in (cfg.model_config, cfg.draft_model_config):
        if mc is not None:
            heads = mc.num_kv_heads // cfg.num_shards
            total += 2 * mc.num_layers * cfg.block_size * heads * mc.head_dim * dtype.itemsize
    return total


def host_kv_budget(cfg: EngineConfig) -> tuple[int, str]:
    """CPU: a fraction of the memory available once the weights are loaded."""
    free = available_host_memory()
    return (
        int(free * cfg.kv_cache_fraction),
        f"{cfg.kv_cache_fraction:g} of {free / 2**30:.1f} GiB available after the weights",
    )


def num_kv_blocks(
    cfg: EngineConfig, per_block: int, measure: Callable[[], tuple[int, str]]
) -> tuple[int, str]:
    """KV capacity in blocks: `max_batch_total_tokens` when given, else
    `--kv-cache-memory` bytes, else what `measure` finds (bytes, and how)."""
    if cfg.max_batch_total_tokens is not None:
        return -(-cfg.max_batch_total_tokens // cfg.block_size), "--max-batch-total-tokens"
    if cfg.kv_cache_memory is not None:
        budget, why = cfg.kv_cache_memory, "--kv-cache-memory"
    else:
        budget, why = measure()
    blocks = budget // per_block
    if blocks < 1:
        raise RuntimeError(
            f"no memory left for the KV cache ({why}: {budget} bytes, one block needs "
            f"{per_block}); lower --max-batch-prefill-tokens or give more memory "
            "(--cuda-memory-fraction, --kv-cache-fraction, --kv-cache-memory)"
        )
    return blocks, f"{budget / 2**30:.2f} GiB = {why}"


# A guess at what capturing the decode graphs allocates (their private memory pool:
# per-bucket activations and attention scratch), kept out of the KV budget.
_GRAPH_RESERVE = 512 * 2**20


class ModelRunner:
    def __init__(self, cfg: EngineConfig, rank: int) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device, rank)
        self.dtype, why_dtype = resolve_dtype(cfg.dtype, self.device)
        log.info("rank %d: dtype %s (%s)", rank, self.dtype_name, why_dtype)
        self.staging = HostStaging(self.device)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        elif cfg.num_shards > 1 and self.device.type == "cpu":  # the ranks share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.num_shards))
        self.step_tokens = cfg.step_tokens(self.device.type)
        self.sequences_per_step = cfg.sequences_per_step(self.device.type)
        mc, shards = cfg.model_config, cfg.num_shards
        shape = (mc.num_heads // shards, mc.num_kv_heads // shards, mc.head_dim)
        self.attention, why_attention = select_backend(
            cfg.attention, self.device, self.dtype, cfg.block_size, shape
        )
        log.info("rank %d: attention backend %s (%s)", rank, self.attention.name, why_attention)
        t0 = time.perf_counter()
        self.tp = join(rank, cfg.num_shards, cfg.ipc_root, self.device)
        # The previous step's sampled tokens, which the next plan may refer to; in tensor
        # parallelism rank 0 alone samples and broadcasts them when plans overlap.
        self._last_tokens = np.empty(0, dtype=np.int32)
        self._share_tokens = cfg.overlap_scheduling and self.tp.size > 1
        self.model = self._load_model()
        self.lora = (
            LoraAdapters(
                self.model,
                cfg.lora_adapters,
                cfg.lora_slots,
                cfg.lora_rank,
                cfg.model_config,
                self.tp,
                self.dtype,
                self.device,
            )
            if cfg.lora_slots
            else None
        )
        draft = self._load_draft() if cfg.draft_model is not None else None
        self.logits = LogitsPipeline(
            cfg.model_config.vocab_size, self.device, cfg.watermark_gamma, cfg.watermark_delta
        )
        graphs = self._graph_buckets()
        self.num_blocks, why = num_kv_blocks(
            cfg, kv_bytes_per_block(cfg, self.dtype), lambda: self._kv_budget(bool(graphs))
        )
        self.kv_caches = self._kv_cache(self.num_blocks)
        self.draft = None
        if draft is not None:
            self.draft = DraftModel(
                cfg, *draft, self.num_blocks, self.tp, self.staging, self.device, self.dtype
            )
        log.info(
            "rank %d: %s loaded in %.1fs (%s, %s); KV cache %d blocks x %d tokens = %d tokens (%s)",
            rank,
            cfg.model.model_id,
            time.perf_counter() - t0,
            self.dtype_name,
            self.device,
            self.num_blocks,
            cfg.block_size,
            self.num_blocks * cfg.block_size,
            why,
        )
        self.graphs = None
        if graphs:
            max_blocks = -(-cfg.model_config.max_position_embeddings // cfg.block_size)
            self.graphs = DecodeGraphs(
                self.model,
                self.kv_caches,
                graphs,
                max_blocks,
                cfg.block_size,
                self.device,
                lora=None if self.lora is None else self.lora.state,
            )

    def _load_model(self) -> torch.nn.Module:
        cfg, last = self.cfg, [0.0]
        method = cfg.quantize
        if method is not None:
            if self.device.type != "cpu":
                raise RuntimeError(f"--quantize {method} runs on the CPU only")
            if self.dtype == torch.float32:
                log.warning(
                    "--quantize %s with float32 activations: torch's int8 / int4 kernels "
                    "take bf16 (activations are rounded to it) and big steps run float32 "
                    "GEMMs: prefer --dtype bfloat16",
                    method,
                )

        def progress(done: int, total: int) -> None:
            now = time.perf_counter()
            if done == total or now - last[0] > 2.0:
                last[0] = now
                log.info("loading weights: %d/%d tensors", done, total)

        return load_model(
            cfg.model,
            cfg.model_config,
            self.dtype,
            self.device,
            progress,
            self.tp,
            dummy=cfg.load_format == "dummy",
            attention=self.attention,
            quantize=method,
            pack_float32=True,
        )

    def _load_draft(self) -> tuple[torch.nn.Module, AttentionBackend]:
        """The draft model (this rank's shard) and its attention backend."""
        cfg = self.cfg
        mc, source, shards = cfg.draft_model_config, cfg.draft_model, cfg.num_shards
        assert mc is not None and source is not None
        shape = (mc.num_heads // shards, mc.num_kv_heads // shards, mc.head_dim)
        attention, why = select_backend(
            cfg.attention, self.device, self.dtype, cfg.block_size, shape
        )
        # GGUF's own 4-bit weights exist only in a GGUF draft; int4 quantizes any other.
        method = cfg.quantize
        if method == "gguf" and source.kind != "gguf":
            method = "int4"
        t0 = time.perf_counter()
        model = load_model(
            source,
            mc,
            self.dtype,
            self.device,
            None,
            self.tp,
            dummy=cfg.load_format == "dummy",
            attention=attention,
            quantize=method,
            pack_float32=True,
        )
        log.info(
            "rank %d: draft model %s loaded in %.1fs (%d layers; attention %s: %s)",
            self.tp.rank,
            source.model_id,
            time.perf_counter() - t0,
            mc.num_layers,
            attention.name,
            why,
        )
        return model, attention

    def _kv_budget(self, graphs: bool) -> tuple[int, str]:
        """Bytes for the KV cache when no option gives them, and how they were found."""
        if self.device.type != "cuda":
            return host_kv_budget(self.cfg)
        if self.attention.reference_plan:
            # Its attention gathers each decode batch's K/V into padded copies whose
            # size depends on context lengths the profile does not know.
            log.warning(
                "rank %d: the %s attention backend's K/V copies are not in the memory "
                "profile; lower --cuda-memory-fraction if steps run out of memory",
                self.tp.rank,
                self.attention.name,
            )
        reserve = _GRAPH_RESERVE if graphs else 0
        return profile_cuda_budget(self.cfg, self.device, self._profile_step, reserve)

    def _kv_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        mc = self.cfg.model_config
        return allocate_kv_cache(
            mc.num_layers,
            num_blocks,
            self.cfg.block_size,
            mc.num_kv_heads // self.cfg.num_shards,
            mc.head_dim,
            self.dtype,
            self.device,
        )

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def _graph_buckets(self) -> tuple[int, ...]:
        """The decode batch sizes to capture: none on the CPU, or without Triton."""
        buckets = self.cfg.cuda_graphs
        if not buckets or self.device.type != "cuda":
            return ()
        if self.attention.name != "triton":
            log.info(
                "CUDA graphs off: the %s attention backend is not captured", self.attention.name
            )
            return ()
        # No step decodes more sequences than these: bigger graphs would never replay.
        most = self.sequences_per_step
        return tuple(b for b in buckets if b <= most) or buckets[:1]

    def _profile_step(self) -> None:
        """The largest step the scheduler may plan: a full prefill budget of tokens
        through the model, then the logits pipeline at its costliest for as many rows
        as a step may sample. Uses a throw-away KV cache of just the blocks it needs."""
        cfg = self.cfg
        tokens = self.step_tokens
        blocks = -(-tokens // cfg.block_size)
        caches = self._kv_cache(blocks)
        attn = AttentionInputs.plan(
            np.array([tokens]),
            np.array([0]),
            np.arange(blocks)[None, :],
            cfg.block_size,
            reference=self.attention.reference_plan,
        )
        uploaded = self.staging.upload([*attn.arrays, np.zeros(tokens, dtype=np.int64)])
        meta = attn.on_device(uploaded[:-1])
        with torch.inference_mode():
            hidden = self.model(uploaded[-1], meta.positions, caches, meta)
            if self.tp.rank == 0:
                logits = self.model.compute_logits(hidden[: self.sequences_per_step])
                self.logits(logits, self.logits.costliest_inputs(logits.shape[0]))

    @torch.inference_mode()
    def step(self, plan: StepPlan, read_mask: Callable[[], np.ndarray] | None = None) -> StepOutput:
        """Sampled token ids and logprobs (and top-n alternatives), one per sampled row.
        `read_mask` gives the grammar bitmask of `plan.grammar.rows` (rank 0, when the
        plan has any): it is read after the forward, which ran while it was computed."""
        plan = self._fill_inputs(plan)
        layout, s = plan.layout, plan.sampling
        if self.lora is not None:
            self.lora.apply(plan.lora, layout.query_lens)
        counts = layout.block_counts
        tables = np.zeros((len(counts), int(counts.max())), dtype=np.int32)
        tables[np.arange(tables.shape[1])[None, :] < counts[:, None]] = layout.block_tables
        drafts = None
        if self.draft is not None:
            proposed = plan.speculative
            if proposed is None:
                proposed = np.zeros(len(layout.query_lens), dtype=np.int32)
            drafts = self.draft.propose(plan, layout.input_ids, tables, proposed)
            if drafts is not None:
                plan = fill_drafts(plan, proposed, drafts)
                layout = plan.layout
        rows = np.flatnonzero(s.sample)
        last_token = (np.cumsum(layout.query_lens) - 1)[rows]
        proposed = plan.speculative[rows] if plan.speculative is not None else None
        if proposed is not None:  # a row verifying k proposals samples first after its
            last_token = last_token - proposed  # last real token, k positions back
        attn = AttentionInputs.plan(
            layout.query_lens,
            layout.context_lens,
            tables,
            self.cfg.block_size,
            reference=self.attention.reference_plan,
        )
        # The rows' last positions' logits, and with drafts those that check them (one
        # pass over the LM head's weights for both).
        logit_rows = last_token
        if drafts is not None:
            assert proposed is not None
            logit_rows = np.concatenate([last_token, draft_positions(proposed, last_token)])
        # The step's integers in one copy, its float sampling columns in another.
        ints = [layout.input_ids, logit_rows, s.top_k[rows], s.seeds[rows], s.sample_index[rows]]
        uploaded = self.staging.upload(attn.arrays + ints)
        meta = attn.on_device(uploaded[: len(attn.arrays)])
        input_ids, last_token_d, top_k, seeds, sample_index = uploaded[len(attn.arrays) :]
        floats = [s.temperature[rows], s.top_p[rows], s.typical_p[rows], s.min_p[rows]]
        temperature, top_p, typical_p, min_p = self.staging.upload(floats, torch.float32)
        if self.graphs is not None and self.graphs.fits(meta):
            hidden = self.graphs.run(meta, input_ids)
        else:
            hidden = self.model(input_ids, meta.positions, self.kv_caches, meta)
        if self.tp.rank != 0:  # rank 0 alone computes logits and samples
            if self._share_tokens and len(rows):
                self._last_tokens = (
                    self.tp.broadcast_from_first(
                        torch.empty(len(rows), dtype=torch.int32, device=self.device)
                    )
                    .cpu()
                    .numpy()
                )
            return StepOutput(np.empty(0, dtype=np.int32), np.empty(0, dtype=np.float32))
        # Every step: prompt chunks feed the penalty histories too.
        history_rows = self.logits.history.update(plan.penalties, layout)
        prompt_logprobs = prompt_tops = None
        if plan.prompt_logprobs.counts.any():
            prompt_logprobs, prompt_tops = self._prompt_logprobs(hidden, plan)
        if len(rows) == 0:
            empty = np.empty(0, dtype=np.int32), np.empty(0, dtype=np.float32)
            return StepOutput(*empty, prompt_logprobs=prompt_logprobs, prompt_tops=prompt_tops)
        sampling = SamplingTensors(temperature, top_k, top_p, typical_p, min_p, seeds, sample_index)
        inputs = self.logits.inputs_from_plan(plan, rows, sampling, history_rows)
        logits = self.model.compute_logits(hidden[last_token_d])
        logits, checking = logits[: len(rows)], logits[len(rows) :]
        if len(plan.grammar.rows):
            if read_mask is None:
                raise RuntimeError(f"step {plan.step_id} has grammar rows but no mask source")
            sampled_row = np.cumsum(s.sample) - 1
            inputs.allowed = (
                to_device(sampled_row[plan.grammar.rows], torch.int64, self.device),
                read_mask(),
            )
        tokens, logprobs, top_ids, top_lps = self.logits(logits, inputs)
        wanted = [tokens.to(torch.int32), logprobs]
        if top_ids is not None:
            wanted += [top_ids.to(torch.int32), top_lps]
        spec = None
        if drafts is not None:
            assert proposed is not None
            checked_at = len(wanted)
            wanted += check_drafts(checking, plan, rows, proposed, drafts)
        elif proposed is not None and proposed.any():
            spec = ngram_draws(
                self.logits, self.model.compute_logits, plan, rows, proposed, last_token, hidden
            )
            wanted += [spec[0].to(torch.int32), *spec[1:]]
        host = self.staging.download(wanted)  # one wait for all of them
        out = StepOutput(host[0], host[1], prompt_logprobs=prompt_logprobs, prompt_tops=prompt_tops)
        if top_ids is not None:
            out.top_ids, out.top_logprobs = host[2], host[3]
        if spec is not None:
            accept_ngram(out, plan, rows, proposed, host[2 + 2 * (top_ids is not None) :])
        if drafts is not None:
            merge_verified(out, proposed > 0, accept_drafts(host[checked_at:], drafts))
        # The next plan may refer to each row's last token (overlapped scheduling).
        self._last_tokens = out.last_tokens()
        if self._share_tokens:  # ... on the other ranks too
            self.tp.broadcast_from_first(torch.from_numpy(self._last_tokens).to(self.device))
        return out

    def _fill_inputs(self, plan: StepPlan) -> StepPlan:
        """The plan with the input tokens it refers back to (overlapped scheduling: the
        scheduler sent it before the previous step's tokens came back) filled in."""
        src = plan.layout.input_from
        if src is None:
            return plan
        rows = np.flatnonzero(src >= 0)
        ids = plan.layout.input_ids.copy()
        ids[np.cumsum(plan.layout.query_lens)[rows] - 1] = self._last_tokens[src[rows]]
        return msgspec.structs.replace(
            plan, layout=msgspec.structs.replace(plan.layout, input_ids=ids)
        )

    def _prompt_logprobs(
        self, hidden: torch.Tensor, plan: StepPlan
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
        """Logprob of each next prompt token, from the raw logits (no temperature or
        penalty, as TGI's prefill details and vLLM's prompt_logprobs), for the rows that
        asked; with `top_k` > -1 also its rank (1 + the tokens more likely) and the top_k
        most likely tokens there."""
        query_lens = plan.layout.query_lens
        starts = np.cumsum(query_lens) - query_lens
        counts, top_k = plan.prompt_logprobs.counts, plan.prompt_logprobs.top_k
        k = -1 if top_k is None else int(top_k[counts > 0].max(initial=-1))
        positions = np.concatenate(
            [np.arange(s, s + c) for s, c in zip(starts, counts, strict=True) if c]
        )
        n, dev = len(positions), self.device
        targets = to_device(plan.prompt_logprobs.targets, torch.int64, dev)
        out = torch.empty(n, dtype=torch.float32, device=dev)
        if k >= 0:
            ranks = torch.empty(n, dtype=torch.int32, device=dev)
            top_ids = torch.empty(n, k, dtype=torch.int32, device=dev)
            top_lps = torch.empty(n, k, dtype=torch.float32, device=dev)
        for i in range(0, n, _PROMPT_LOGPROB_CHUNK):
            pos = to_device(positions[i : i + _PROMPT_LOGPROB_CHUNK], torch.int64, dev)
            logp = self.model.compute_logits(hidden[pos]).float().log_softmax(dim=-1)
            target = logp.gather(1, targets[i : i + len(pos), None])
            out[i : i + len(pos)] = target.squeeze(1)
            if k >= 0:
                ranks[i : i + len(pos)] = (logp > target).sum(dim=1) + 1
                if k:
                    values, ids = logp.topk(k, dim=-1)
                    top_ids[i : i + len(pos)], top_lps[i : i + len(pos)] = ids, values
        if k < 0:
            return out.cpu().numpy(), None
        host = ranks.cpu().numpy(), top_ids.cpu().numpy(), top_lps.cpu().numpy()
        return out.cpu().numpy(), host
