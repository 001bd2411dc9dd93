"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) over the paged KV cache.

Parameter names follow Hugging Face's, except the fused `qkv_proj` (q, k, v rows
stacked) and `gate_up_proj` (gate rows, then up rows). Numerics follow HF's
eager implementation op for op, so float32 logits match it to rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tgi_mp.executor.parallel import SINGLE, TensorParallel
from tgi_mp.kernels.attention import AttentionMetadata
from tgi_mp.kernels.backends import TORCH_ATTENTION, AttentionBackend
from tgi_mp.model_source import ModelConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (k_cache, v_cache)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 even for bf16 activations, cast back before the scale (as HF).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies `[head_dim // 2]` (float32) for the config's RoPE variant."""
    d = cfg.head_dim
    # device="cpu" explicitly: models are built under `torch.device("meta")`.
    inv = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d)
    )
    rs = cfg.rope_scaling or {"rope_type": "default"}
    kind = rs["rope_type"]
    if kind == "linear":
        inv = inv / rs["factor"]
    elif kind == "llama3":
        # Llama 3.1: long wavelengths slowed down by `factor`, short ones kept,
        # a linear blend (in 1/wavelength) in between.
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_ctx = rs.get("original_max_position_embeddings", cfg.max_position_embeddings)
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / hi) & ~(wavelen > old_ctx / lo)
        inv = torch.where(medium, blended, scaled)
    elif kind != "default":
        raise ValueError(f"unsupported RoPE type {kind!r}")
    if cfg.rope_freq_factors is not None:  # llama.cpp's rope_freqs: divide each frequency
        inv = inv / torch.tensor(cfg.rope_freq_factors, dtype=torch.float32, device="cpu")
    return inv


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of `x` `[T, heads, D]` (HF's rotate_half layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LayerOps:
    """A layer's elementwise chain, op for op as HF (the reference, and float32's path);
    `kernels.cpu_ops.FusedLayerOps` is the same in a few C++ calls, for bf16 CPUs."""

    def add_rms_norm(
        self, hidden: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden + delta, its norm): the residual add and the next layer norm."""
        if delta is not None:
            hidden = hidden + delta
        return hidden, norm(hidden)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


TORCH_OPS = LayerOps()


class Attention(nn.Module):
    """This rank's attention heads; with tensor parallelism `o_proj` gives a partial sum."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, attention: AttentionBackend) -> None:
        super().__init__()
        self.tp = tp
        self.attention = attention
        self.ops = TORCH_OPS
        self.num_heads = cfg.num_heads // tp.size
        self.num_kv_heads = cfg.num_kv_heads // tp.size
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.attention_out_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.ops.rope(
            q.view(t, self.num_heads, self.head_dim),
            k.view(t, self.num_kv_heads, self.head_dim),
            cos,
            sin,
        )
        k_cache, v_cache = kv_cache
        v = v.view(t, self.num_kv_heads, self.head_dim)
        self.attention.write_kv(k, v, k_cache, v_cache, meta)
        out = self.attention.attend(q, k_cache, v_cache, meta, self.scale)
        return self.tp.all_reduce(self.o_proj(out.reshape(t, self.q_size)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.ops = TORCH_OPS
        inter = cfg.intermediate_size // tp.size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(self.ops.silu_mul(self.gate_up_proj(x))))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, attention: AttentionBackend) -> None:
        super().__init__()
        self.ops = TORCH_OPS
        self.self_attn = Attention(cfg, tp, attention)
        self.mlp = MLP(cfg, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        h: torch.Tensor,
        delta: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual stream, this layer's MLP output): the caller adds the second to the
        first with the next norm (`LayerOps.add_rms_norm`), one fused op on the CPU."""
        h, x = self.ops.add_rms_norm(h, delta, self.input_layernorm)
        attended = self.self_attn(x, cos, sin, kv_cache, meta)
        h, x = self.ops.add_rms_norm(h, attended, self.post_attention_layernorm)
        return h, self.mlp(x)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, attention: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp, attention) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        tp: TensorParallel = SINGLE,
        attention: AttentionBackend = TORCH_ATTENTION,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp = tp
        self.model = LlamaModel(cfg, tp, attention)
        # Tied: no lm_head module at all, compute_logits reads the embedding (so a
        # meta-device build + to_empty cannot silently untie them).
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        # A plain attribute, not a buffer: it must stay float32 whatever the model dtype.
        self.inv_freq = rope_inv_freq(cfg)
        # The LM head in oneDNN's layout (executor/packed.py), when packed: then it is
        # the head, tied or not (an untied `lm_head` is dropped once packed).
        self.packed_head: nn.Module | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions: `[T]`; returns the final-norm hidden states `[T, hidden]`."""
        h = self.model.embed_tokens(input_ids)
        if self.inv_freq.device != h.device:
            self.inv_freq = self.inv_freq.to(h.device)
        # cos/sin once per step for all layers; in float32 then cast, as HF does.
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos().to(h.dtype)[:, None], freqs.sin().to(h.dtype)[:, None]
        delta = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            h, delta = layer(h, delta, cos, sin, kv_cache, meta)
        return self.ops.add_rms_norm(h, delta, self.model.norm)[1]

    @property
    def ops(self) -> LayerOps:
        return self.model.layers[0].ops

    def use_ops(self, ops: LayerOps) -> None:
        """Run the elementwise chain with `ops` (e.g. the fused CPU kernels)."""
        for layer in self.model.layers:
            layer.ops = layer.self_attn.ops = layer.mlp.ops = ops

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden `[n, hidden]` (rows already picked by the caller) -> float32 `[n, vocab]`."""
        if self.packed_head is not None:
            return self.packed_head(hidden).float()
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()
