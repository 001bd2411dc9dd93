"""Multi-LoRA: y = W x + s_a · B_a (A_a x) for each row's adapter a, many adapters per step.

The scheduler keeps up to `max_loras` adapters resident in numbered slots and
tells the executors which adapter to load into which slot (`LoraColumns.loads`)
and which slot each row uses. Per fused projection and layer, the slots' A
matrices are stacked into one `[g·S·R, in]` matrix (g sub-projections: q, k, v
of `qkv_proj`; gate, up of `gate_up_proj`; S slots of R ranks each, a smaller
rank zero-padded) and their B matrices into one block-diagonal `[out, g·S·R]`
one. A step then costs two GEMMs per projection whatever its adapter mix:
`s = x Aᵀ`, `s *= mask` (each token's row keeps its own slot's columns, times
that adapter's scale; every other column becomes 0), `y += s Bᵀ`. The masked
columns are computed for nothing, but at these sizes a GEMM's fixed cost is most
of its time (16 µs per oneDNN bf16 call on 2 cores, ~25 µs with 32 rows), so
one GEMM over all slots beats one per adapter group (measured: SmolLM2's 30
layers at 32 rows, 4 rank-16 adapters on all 7 projections, 7.6 ms against
31.6 ms for a loop over adapter segments and 44.7 ms for per-row gathered
weights). Steps without adapter rows skip it all.

With tensor parallelism A and B split like the weight they attach to:
column-parallel projections (q/k/v, gate/up) keep A whole and take their rows of
B; row-parallel ones (o, down) take their input columns of A and keep B whole,
so each rank adds B(A_r x_r) to its partial sum and the all-reduce adds the
rest. Under CUDA graphs the masks are static buffers the graph reads
(`to_static`), so the adapter choice is a graph input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from tgi_mp.executor.packed import PackedLinear, packing_applies
from tgi_mp.executor.parallel import TensorParallel
from tgi_mp.ipc.messages import LoraColumns
from tgi_mp.lora_source import _KEY, LoraSpec, projection_shapes
from tgi_mp.model_source import ModelConfig

log = logging.getLogger("tgi_mp.executor")

# Our fused projection -> (its parent module's attribute, HF sub-projections in row order)
GROUPS = {
    "qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "o_proj": ("self_attn", ("o_proj",)),
    "gate_up_proj": ("mlp", ("gate_proj", "up_proj")),
    "down_proj": ("mlp", ("down_proj",)),
}
_ROW_PARALLEL = {"o_proj", "down_proj"}  # their input is split across ranks


class _Dense(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


@dataclass
class _Group:
    """One layer's stacked adapters for one fused projection."""

    a: torch.Tensor  # [g*S*R, in]
    b: torch.Tensor  # [out, g*S*R], block-diagonal by sub-projection
    row_offsets: list[tuple[int, int]]  # each sub-projection's (first row, rows) in `b`
    shrink: nn.Module | None = None  # GEMMs over a and b (oneDNN-packed when bf16 on CPU)
    expand: nn.Module | None = None


class LoraState:
    """The resident slots and this step's masks, shared by every `LoraLinear`."""

    def __init__(
        self, slots: int, rank: int, dtype: torch.dtype, device: torch.device, pack: bool
    ) -> None:
        self.slots, self.rank = slots, rank
        self.dtype, self.device, self.pack = dtype, device, pack
        self.scales = torch.zeros(slots, dtype=torch.float32)
        # Per sub-projection count g: [tokens, g*S*R], or None when no row has an adapter.
        self.masks: dict[int, torch.Tensor | None] = {1: None, 2: None, 3: None}
        self.static: dict[int, torch.Tensor] = {}
        self.groups: list[_Group] = []

    @property
    def width(self) -> int:  # columns per sub-projection
        return self.slots * self.rank

    def set_step(self, lora: LoraColumns | None, query_lens: np.ndarray) -> None:
        """This step's masks from each row's slot (-1: the base model)."""
        if lora is None or not (lora.slots >= 0).any():
            self.masks = dict.fromkeys(self.masks)
            return
        token_slots = torch.from_numpy(np.repeat(lora.slots, query_lens).astype(np.int64))
        hit = token_slots[:, None] == torch.arange(self.slots)[None, :]
        per_slot = (hit * self.scales[None, :]).to(self.dtype)  # [T, S]
        mask = per_slot.repeat_interleave(self.rank, dim=1).to(self.device)
        self.masks = {g: mask if g == 1 else mask.repeat(1, g) for g in self.masks}

    def to_static(self, n: int, batch: int) -> None:
        """Points the masks at static buffers (their first `batch` rows), holding this
        step's masks for rows < n and zeros after: what a CUDA graph replays over."""
        for g in self.masks:
            buf = self.static.get(g)
            if buf is None or buf.shape[0] < batch:
                buf = self.static[g] = torch.zeros(
                    batch, g * self.width, dtype=self.dtype, device=self.device
                )
            current = self.masks[g]
            if current is None:
                buf[:n].zero_()
            else:
                buf[:n].copy_(current)
            buf[n:batch].zero_()
            self.masks[g] = buf[:batch]

    def repack(self, group: _Group) -> None:
        if self.pack:
            group.shrink, group.expand = PackedLinear(group.a, None), PackedLinear(group.b, None)
        else:
            group.shrink, group.expand = _Dense(group.a), _Dense(group.b)


class LoraLinear(nn.Module):
    """A projection (dense, packed or quantized) plus its layer's stacked adapters."""

    def __init__(self, base: nn.Module, group: _Group, subs: int, state: LoraState) -> None:
        super().__init__()
        self.base = base
        self.group = group
        self.subs = subs
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        mask = self.state.masks[self.subs]
        if mask is None:
            return y
        flat = x.reshape(-1, x.shape[-1])
        s = self.group.shrink(flat).mul_(mask)
        return y.add_(self.group.expand(s).view(y.shape))


class LoraAdapters:
    """Every configured adapter's weights on the host (this rank's slices), and the
    slots of the model's `LoraLinear`s they are copied into when the plan says."""

    def __init__(
        self,
        model: nn.Module,
        specs: tuple[LoraSpec, ...],
        slots: int,
        rank: int,
        mc: ModelConfig,
        tp: TensorParallel,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.specs = specs
        self.state = LoraState(slots, rank, dtype, device, packing_applies(dtype, device))
        self.resident: list[int] = [-1] * slots  # adapter index in each slot
        self.host = [_read(spec, mc, tp, dtype) for spec in specs]
        targeted = {m for spec in specs for m in spec.modules}
        shapes = projection_shapes(mc)
        self.layers: list[dict[str, _Group]] = []
        for layer in model.model.layers:
            groups = {}
            for name, (parent, subs) in GROUPS.items():
                if not targeted & set(subs):
                    continue
                owner = getattr(layer, parent)
                groups[name] = group = self._group(subs, shapes, tp)
                self.state.repack(group)
                setattr(owner, name, LoraLinear(getattr(owner, name), group, len(subs), self.state))
            self.layers.append(groups)
        log.info(
            "LoRA: %d adapter(s) (%s), %d slot(s) of rank %d on %s",
            len(specs),
            ", ".join(s.name for s in specs),
            slots,
            rank,
            ", ".join(g for g in GROUPS if g in self.layers[0]),
        )

    def _group(self, subs: tuple[str, ...], shapes: dict, tp: TensorParallel) -> _Group:
        width = self.state.width
        n_in = shapes[subs[0]][0] // (tp.size if subs[0] in _ROW_PARALLEL else 1)
        outs = [shapes[s][1] // (1 if s in _ROW_PARALLEL else tp.size) for s in subs]
        offsets = [(sum(outs[:i]), o) for i, o in enumerate(outs)]
        st = self.state
        a = torch.zeros(len(subs) * width, n_in, dtype=st.dtype, device=st.device)
        b = torch.zeros(sum(outs), len(subs) * width, dtype=st.dtype, device=st.device)
        return _Group(a, b, offsets)

    def apply(self, lora: LoraColumns | None, query_lens: np.ndarray) -> None:
        """The plan's slot loads, then this step's masks."""
        if lora is not None:
            for slot, adapter in zip(
                lora.load_slots.tolist(), lora.load_adapters.tolist(), strict=True
            ):
                self._load(slot, adapter)
        self.state.set_step(lora, query_lens)

    def _load(self, slot: int, adapter: int) -> None:
        if self.resident[slot] == adapter:
            return
        spec, weights = self.specs[adapter], self.host[adapter]
        rank, width = self.state.rank, self.state.width
        for layer, groups in enumerate(self.layers):
            for name, group in groups.items():
                for i, sub in enumerate(GROUPS[name][1]):
                    row, rows = group.row_offsets[i]
                    at = i * width + slot * rank  # this slot's columns of sub-projection i
                    group.a[at : at + rank].zero_()
                    group.b[row : row + rows, at : at + rank].zero_()
                    if (pair := weights.get((layer, sub))) is not None:
                        group.a[at : at + spec.rank].copy_(pair[0])
                        group.b[row : row + rows, at : at + spec.rank].copy_(pair[1])
                self.state.repack(group)
        self.state.scales[slot] = spec.scale
        self.resident[slot] = adapter


def _read(
    spec: LoraSpec, mc: ModelConfig, tp: TensorParallel, dtype: torch.dtype
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """(layer, HF projection) -> (A [r, in], B [out, r]), this rank's slices, on the host."""
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    with safe_open(spec.weights_path, framework="pt") as st:
        for key in st.keys():  # noqa: SIM118 (safe_open is not a dict)
            m = _KEY.match(key)
            assert m is not None, f"{key} passed the launcher's check"
            layer, module, ab = int(m[1]), m[2], m[3]
            part = st.get_slice(key)
            rows, cols = part.get_shape()
            if tp.size > 1 and ab == "A" and module in _ROW_PARALLEL:
                lo, hi = tp.share(cols)
                t = part[:, lo:hi]
            elif tp.size > 1 and ab == "B" and module not in _ROW_PARALLEL:
                lo, hi = tp.share(rows)
                t = part[lo:hi]
            else:
                t = part[:]
            found.setdefault((layer, module), {})[ab] = t.to(dtype).contiguous()
    return {k: (v["A"], v["B"]) for k, v in found.items()}
