"""Weight-only quantization of a loaded model's linear layers (`--quantize`).

`int8`: each output channel's weights scaled into -127..127 (symmetric, one scale
per row), from any float checkpoint, at load. A decode step reads half of bf16's
bytes. Small batches run torch's int8 x bf16 kernel (`_weight_int8pack_mm`,
int8 -> float inside its tiles; float32 activations are rounded to bf16 for it, as
for int4: its float32 path is ~4x slower); above `SMALL_BATCH` rows that kernel falls behind
a float GEMM (cpu-speed.md measures it), so big steps dequantize the weight once
per call and run `F.linear` — or, with bf16 on the CPU, run a packed dense copy
made at load (`executor/packed.py`: dequantizing per call cost 40% of a batch-32
step), at 1.5x the dense weights' memory. Measured (perf/RESULTS.md): with bf16
activations int8 is faster than bf16 weights at small batches. With float32 ones
the small-batch GEMMs still round to bf16 and big steps dequantize per call: the
runner advises bf16.

`int4`: groups of `INT4_GROUP` weights along the input share a scale and a zero,
w = (q - 8) * scale + zero with q in 0..15 — torch's int4pack layout, into which a
GGUF's Q4_0 / Q4_1 blocks map bit for bit (`GroupQuantized.from_gguf`), so those
are served as shipped; other weights are quantized min-max at load. torch's int4
kernel computes in bf16 only and re-dequantizes the weight per 4 rows, so it wins
up to `SMALL_BATCH` rows and loses well above (cpu-speed.md: 12 vs 15 ms at 16
rows, 22 vs 19 at 32); dequantizing 4-bit weights per call costs more than the
GEMM, so bigger steps use a dense copy kept at load: int4 on the CPU is a latency
mode, its weights take 1.25x the dense ones' memory.

`gguf`: a GGUF's 4-bit linears as shipped (as `int4`); the rest stay dense.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tgi_mp.options import CHOICES

log = logging.getLogger("tgi_mp.executor")

# Rows up to which the int8 / int4 kernels beat the packed bf16 GEMM (perf/bench_linears.py:
# at 8 rows int4 6.0 / int8 7.4 vs 9.1 ms, at 16 11.0 / 13.0 vs 10.2).
SMALL_BATCH = 8
INT4_GROUP = 32  # weights per scale/zero: llama.cpp's Q4 block, and it divides every K here
# The linears of each decoder layer that are quantized (embeddings and LM head are not).
TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 rows and one float scale per row."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight_int8", weight)  # int8 [out, in]
        self.register_buffer("scales", scales)  # [out], the activations' dtype
        self.register_buffer("kernel_scales", scales.to(torch.bfloat16))  # the kernel's dtype
        self.bias = bias
        self.dense_linear: nn.Module | None = None  # a packed dense copy (executor/packed.py)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q.contiguous(), scales.to(linear.weight.dtype), bias)

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.to(self.scales.dtype) * self.scales[:, None]

    def nbytes(self) -> int:
        return self.weight_int8.numel() + self.kernel_scales.numel() * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] <= SMALL_BATCH:
            # bf16 in: torch's int8 kernel is fast for bf16 only (float32 is 4x slower).
            a = flat.to(torch.bfloat16).contiguous()
            y = torch._weight_int8pack_mm(a, self.weight_int8, self.kernel_scales)
            y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        if self.dense_linear is not None:
            return self.dense_linear(x)
        return F.linear(x, self.dequantized(), self.bias)

    def pack_dense(self, linear: nn.Module) -> None:
        """Big batches run `linear` (the dequantized weight and the bias, packed) instead
        of dequantizing per call."""
        self.dense_linear = linear


@dataclass
class GroupQuantized:
    """A 4-bit weight before packing: w[n, k] = (codes[n, k] - 8) * scales[n, k // g] +
    zeros[n, k // g], g = `group`."""

    codes: torch.Tensor  # uint8 [N, K], values 0..15
    scales: torch.Tensor  # float32 [N, K // group]
    zeros: torch.Tensor  # float32 [N, K // group]
    group: int

    @classmethod
    def from_float(cls, w: torch.Tensor, group: int = INT4_GROUP) -> GroupQuantized:
        """Min-max per group: the group's extremes are codes 0 and 15."""
        n, k = w.shape
        g = w.float().reshape(n, k // group, group)
        lo, hi = g.amin(-1), g.amax(-1)
        scales = ((hi - lo) / 15).clamp(min=1e-10)
        codes = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15)
        return cls(codes.to(torch.uint8).reshape(n, k), scales, lo + 8 * scales, group)

    @classmethod
    def from_gguf(cls, blocks: np.ndarray, kind: str, shape: tuple[int, int]) -> GroupQuantized:
        """A GGUF tensor's raw `Q4_0` / `Q4_1` blocks (uint8 `[rows, bytes]`) as they are.

        Each block of 32 weights is an fp16 `d` (Q4_1: then an fp16 `m`) and 16 bytes of
        nibbles: byte j holds weight j (low nibble) and weight j + 16 (high). Q4_0 reads
        d * (q - 8), Q4_1 d * q + m = (q - 8) * d + (m + 8d): scale d, zero 0 or m + 8d.
        """
        n, k = shape
        head = 2 if kind == "Q4_0" else 4
        b = blocks.reshape(n, k // 32, head + 16)
        d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        nibbles = b[..., head:]
        codes = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).reshape(n, k)
        if kind == "Q4_0":
            zeros = np.zeros_like(d)
        else:
            zeros = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) + 8 * d
        return cls(torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(zeros), 32)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def rows(self, index: np.ndarray | slice) -> GroupQuantized:
        return GroupQuantized(self.codes[index], self.scales[index], self.zeros[index], self.group)

    def columns(self, start: int, stop: int) -> GroupQuantized:
        """Input columns [start, stop), both on group boundaries."""
        g = self.group
        if start % g or stop % g:
            raise ValueError(f"columns {start}:{stop} split groups of {g}")
        return GroupQuantized(
            self.codes[:, start:stop].contiguous(),
            self.scales[:, start // g : stop // g].contiguous(),
            self.zeros[:, start // g : stop // g].contiguous(),
            g,
        )

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        g = self.codes.reshape(n, k // self.group, self.group).float() - 8
        return (g * self.scales[..., None] + self.zeros[..., None]).reshape(n, k)

    @staticmethod
    def concat(parts: list[GroupQuantized]) -> GroupQuantized:
        """Row blocks (the shards of a fused projection) as one weight."""
        if len({p.group for p in parts}) != 1:
            raise ValueError("shards of one projection quantized with different group sizes")
        return GroupQuantized(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scales for p in parts]),
            torch.cat([p.zeros for p in parts]),
            parts[0].group,
        )


def int4_fits(out_features: int, in_features: int, group: int = INT4_GROUP) -> bool:
    """torch's int4pack needs whole groups along K and output rows in sixteens."""
    return out_features % 16 == 0 and in_features % group == 0


class Int4Linear(nn.Module):
    """y = x W^T + b: packed 4-bit W for small batches, a dense copy for big ones."""

    def __init__(self, q: GroupQuantized, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        if not int4_fits(*q.shape, q.group):
            raise ValueError(f"int4 needs out % 16 == 0 and in % {q.group} == 0, got {q.shape}")
        self.group = q.group
        self.register_buffer(
            "weight_int4", torch._convert_weight_to_int4pack_for_cpu(q.codes.to(torch.int32), 8)
        )
        # [K / g, N, 2] of (scale, zero), bf16: the kernel's only fast dtype on the CPU.
        self.register_buffer(
            "scale_zeros",
            torch.stack([q.scales.t(), q.zeros.t()], dim=-1).to(torch.bfloat16).contiguous(),
        )
        self.register_buffer("dense", q.dequantize().to(dtype))
        self.dense_linear: nn.Module | None = None  # the dense copy packed (executor/packed.py)
        self.bias = bias

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int4Linear:
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(GroupQuantized.from_float(linear.weight), bias, linear.weight.dtype)

    def pack_dense(self, linear: nn.Module) -> None:
        """Big batches run `linear` (the dense copy and the bias, repacked) instead."""
        self.dense_linear = linear
        del self.dense

    def dense_nbytes(self) -> int:
        w = self.dense_linear if self.dense_linear is not None else self.dense
        return int(w.nbytes)

    def nbytes(self) -> int:
        """Bytes the small-batch path reads (the dense copy aside)."""
        return self.weight_int4.numel() + self.scale_zeros.numel() * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] > SMALL_BATCH:
            if self.dense_linear is not None:
                return self.dense_linear(x)
            return F.linear(x, self.dense, self.bias)
        a = flat.to(torch.bfloat16).contiguous()
        y = torch._weight_int4pack_mm_for_cpu(a, self.weight_int4, self.group, self.scale_zeros)
        y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


# A module path (e.g. "model.layers.3.self_attn.qkv_proj") -> its weight's 4-bit row
# blocks as the checkpoint shipped them, in the fused order; None where a shard is not.
Shipped = dict[str, list[GroupQuantized | None]]
Refill = Callable[[str, int, torch.Tensor], None]  # (module path, shard, float rows) -> None


@torch.no_grad()
def quantize_model(
    model: nn.Module, method: str, shipped: Shipped | None = None, refill: Refill | None = None
) -> tuple[int, int]:
    """Replaces the decoder layers' linears in place; (bytes before, bytes after).

    `shipped`: 4-bit weights read from the checkpoint as they are. A projection all of
    whose shards are there is packed from them; otherwise `refill` first writes the
    shipped shards' float values into its weight, which is then quantized (int8 /
    int4) or kept dense (gguf)."""
    if method not in CHOICES["quantize"]:
        raise ValueError(f"--quantize {method!r}: supported: {', '.join(CHOICES['quantize'])}")
    shipped = shipped or {}
    before = after = 0
    kept = requantized = 0
    for path, module in list(model.named_modules()):
        for name in TARGETS:
            linear = getattr(module, name, None)
            if not isinstance(linear, nn.Linear):
                continue
            full = f"{path}.{name}" if path else name
            parts = shipped.get(full, [])
            weight_bytes = linear.weight.numel() * linear.weight.element_size()
            q: nn.Module | None = None
            if method != "int8" and parts and all(p is not None for p in parts):
                bias = None if linear.bias is None else linear.bias.detach()
                q = Int4Linear(GroupQuantized.concat(parts), bias, linear.weight.dtype)  # type: ignore[arg-type]
                kept += 1
            else:
                for shard, part in enumerate(parts):
                    if part is not None and refill is not None:
                        refill(full, shard, part.dequantize())
                if method == "int8":
                    q = Int8Linear.from_linear(linear)
                elif method == "int4" and int4_fits(*linear.weight.shape):
                    q = Int4Linear.from_linear(linear)
                    requantized += 1
            before += weight_bytes
            if q is None:
                after += weight_bytes
                continue
            after += q.nbytes()  # type: ignore[operator]
            setattr(module, name, q)
    if before == 0:  # e.g. called after executor/packed.py replaced them
        raise ValueError("--quantize: the model has no float decoder projections left to quantize")
    if method != "int8":
        log.info(
            "int4: %d projections as the checkpoint shipped them, %d quantized at load",
            kept,
            requantized,
        )
    return before, after
