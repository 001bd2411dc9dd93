"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step launches a few kernels per layer; at small batches their launch cost
is most of the step. Each bucket's forward is captured once at start over static
input buffers; a step of n sequences copies its inputs into the first n rows of the
smallest bucket >= n and replays. Padding rows are inert by construction of the
Triton kernels: slot -1 writes no K/V, seq_len 0 attends to nothing.

Only the Triton backend is captured: the torch reference plans on the host, and
flash-attn's varlen call takes the step's maximum lengths as host integers.
The same static-buffer path runs eagerly on the CPU (`capture=False`), which is how
tests check the padding logic without a GPU.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from tgi_mp.executor.lora import LoraState
from tgi_mp.kernels.attention import AttentionMetadata

log = logging.getLogger("tgi_mp.executor")

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class DecodeGraphs:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: KVCache,
        buckets: tuple[int, ...],
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device,
        capture: bool = True,
        lora: LoraState | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = tuple(sorted(buckets))
        self.max_batch = self.buckets[-1]
        self.max_blocks = max_blocks_per_seq
        self.block_size = block_size
        self.capture = capture
        self.lora = lora  # its masks become static inputs of the graphs
        n = self.max_batch

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int64, device=device)

        self.input_ids = zeros(n)
        self.positions = zeros(n)
        self.slot_mapping = zeros(n)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int64, device=device)
        self.seq_lens = zeros(n)
        self.block_tables = zeros(n, max_blocks_per_seq)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all(device)

    def _meta(self, batch: int) -> AttentionMetadata:
        """Metadata over the first `batch` rows of the static buffers (no host-side plan:
        that is the torch reference's, which is never captured)."""
        return AttentionMetadata(
            positions=self.positions[:batch],
            slot_mapping=self.slot_mapping[:batch],
            query_start_loc=self.query_start_loc[: batch + 1],
            seq_lens=self.seq_lens[:batch],
            block_tables=self.block_tables[:batch],
            block_size=self.block_size,
            all_decode=True,
        )

    def _forward(self, batch: int) -> torch.Tensor:
        meta = self._meta(batch)
        return self.model(self.input_ids[:batch], meta.positions, self.kv_caches, meta)

    def _capture_all(self, device: torch.device) -> None:
        # The rows hold padding while capturing: every launch is inert, nothing is written.
        self.slot_mapping.fill_(-1)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for batch in reversed(self.buckets):  # largest first: later ones reuse its pool
                if self.lora is not None:
                    self.lora.to_static(0, batch)
                self._forward(batch)  # warm-up: Triton compiles, lazy state settles
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.outputs[batch] = self._forward(batch)
                self.graphs[batch] = graph
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        log.info("captured CUDA graphs for decode batch sizes %s", ",".join(map(str, self.buckets)))

    def fits(self, meta: AttentionMetadata) -> bool:
        return (
            meta.all_decode
            and meta.num_tokens <= self.max_batch
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    def run(self, meta: AttentionMetadata, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states `[n, hidden]` of a decode step that `fits`."""
        n = meta.num_tokens
        batch = next(b for b in self.buckets if b >= n)
        width = meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(meta.positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        # Padding rows of this bucket: no write, no keys (stale values from a bigger
        # step before would otherwise write K/V into live blocks).
        self.slot_mapping[n:batch].fill_(-1)
        self.seq_lens[n:batch].zero_()
        if self.lora is not None:  # this step's adapter masks, zeros for padding rows
            self.lora.to_static(n, batch)
        if not self.capture:
            return self._forward(batch)[:n]
        self.graphs[batch].replay()
        return self.outputs[batch][:n]
