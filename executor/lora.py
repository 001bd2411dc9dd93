"""Multi-LoRA: y = W x + s_a · B_a (A_a x) for each token's adapter a, many per step.

The scheduler keeps up to `max_loras` adapters resident in numbered slots and
tells the executors which adapter to load into which slot (`LoraColumns.loads`)
and which slot each row uses. Per fused projection (g sub-projections: q, k, v of
`qkv_proj`; gate, up of `gate_up_proj`) and layer, the slots' A matrices are
stacked into one `[S·g·R, in]` matrix (S slots of rank R, a smaller rank
zero-padded) and their B matrices into one `[out, S·g·R]` matrix whose slot s,
sub i columns feed only sub i's rows. A step runs its adapter tokens one of three
ways (the cost notes below): the C++ BGMV kernel (`kernels/cpu_lora.cpp`: each
token through its own adapter, tokens of one slot in blocks of 4 so each weight is
loaded once per block), one GEMM pair over every slot with each token's row
masked to its own slot's columns times its scale (`masked`: the CUDA-graph and
GPU path, the adapter choice a static mask input), or one GEMM pair per slot on
its rows (`segments`). No per-row Python loop, no merged weights; steps without
adapter rows skip it all.

With tensor parallelism A and B split like the weight they attach to:
column-parallel projections (q/k/v, gate/up) keep A whole and take their rows of
B; row-parallel ones (o, down) take their input columns of A and keep B whole,
so each rank adds B(A_r x_r) to its partial sum and the all-reduce adds the rest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from tgi_mp.executor.packed import PackedLinear, packing_applies
from tgi_mp.executor.parallel import TensorParallel
from tgi_mp.ipc.messages import LoraColumns
from tgi_mp.kernels.cpu_build import KernelUnavailable
from tgi_mp.kernels.cpu_lora import MAX_RANK, LoraKernel, TokenBlocks
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


def _gemm(weight: torch.Tensor, pack: bool) -> nn.Module:
    return PackedLinear(weight, None) if pack else _Dense(weight)


@dataclass
class _Group:
    """One layer's adapters for one fused projection: columns ordered (slot, sub, rank)."""

    a: torch.Tensor  # [S*g*R, in]
    b: torch.Tensor  # [out, S*g*R]: slot s, sub i's columns feed only sub i's rows
    row_offsets: list[tuple[int, int]]  # each sub-projection's (first row, rows) in `b`
    shrink: nn.Module | None = None  # GEMMs over a and b (oneDNN-packed when bf16 on CPU)
    expand: nn.Module | None = None
    # Per slot: its own A rows and its B columns times its scale, for `segments` steps.
    slot_shrink: list[nn.Module | None] = field(default_factory=list)
    slot_expand: list[nn.Module | None] = field(default_factory=list)
    # For the C++ kernel: each slot's scaled B, transposed per sub-projection
    # ([S, R * out]), and the sub-projections' row offsets ([g + 1]).
    bt: torch.Tensor | None = None
    offs: torch.Tensor | None = None


# How a step's adapter tokens run. `kernel` (bf16 on CPUs with AVX512-BF16): the C++
# BGMV, each token through its own adapter only, 4 calls a layer. Else the cheaper,
# by this cost model (per layer, µs; measured on 2 AVX512-BF16 cores with SmolLM2,
# only speed depends on it), of `masked`: one GEMM pair over every slot, each token
# keeping its own slot's columns (a fixed cost plus FLOPs for tokens x slots), and
# `segments`: one GEMM pair per slot on its rows (gathered unless contiguous: FLOPs
# for the adapter tokens only, the fixed cost per slot). Measured in a forward at 32
# decode tokens on 4 adapters, against the base model: kernel +17%, masked +41%,
# segments +120%; at 256 prompt tokens on one: kernel +14%, segments +17%, masked +43%.
_CALLS_US = 120.0  # 8 small GEMMs (4 projections x shrink, expand)
_TOKEN_SLOT_US = 2.4  # one token through one rank-16 slot of all 7 projections
_GATHER_US = 40.0  # gathering and scattering one slot's rows in every projection


def _kernel(dtype: torch.dtype, device: torch.device, rank: int) -> LoraKernel | None:
    """The C++ BGMV where it is fast: bf16 on a CPU with AVX512-BF16."""
    if dtype != torch.bfloat16 or device.type != "cpu" or rank > MAX_RANK:
        return None
    try:
        kernel = LoraKernel()
    except KernelUnavailable as e:
        log.warning("LoRA: no C++ kernel (%s); GEMMs over the slots instead", e)
        return None
    return kernel if kernel.fast else None


class LoraState:
    """The resident slots and how this step runs them, shared by every `LoraLinear`."""

    def __init__(
        self,
        slots: int,
        rank: int,
        dtype: torch.dtype,
        device: torch.device,
        pack: bool,
        kernel: LoraKernel | str | None = "auto",
    ) -> None:
        self.slots, self.rank = slots, rank
        self.dtype, self.device, self.pack = dtype, device, pack
        self.scales = torch.zeros(slots, dtype=torch.float32)
        self.mode: str | None = None  # None (no adapter row), "masked", "segments", "kernel"
        self.kernel = _kernel(dtype, device, rank) if kernel == "auto" else kernel
        self.blocks: TokenBlocks | None = None  # kernel: the adapter tokens by slot
        self.force: str | None = None  # tests: always this mode
        # masked: per sub-projection count g, [tokens, S*g*R]
        self.masks: dict[int, torch.Tensor | None] = {1: None, 2: None, 3: None}
        # segments: (slot, (start, stop) or token indices)
        self.runs: list[tuple[int, tuple[int, int] | torch.Tensor]] = []
        self._token_slots = np.empty(0, dtype=np.int32)
        self.static: dict[int, torch.Tensor] = {}

    def set_step(self, lora: LoraColumns | None, query_lens: np.ndarray) -> None:
        """This step's mode, masks or runs, from each row's slot (-1: the base model)."""
        self.mode = None
        if lora is None or not (lora.slots >= 0).any():
            return
        token_slots = np.repeat(lora.slots, query_lens)
        active = np.unique(token_slots[token_slots >= 0])
        runs: list = []
        gathers = 0
        for slot in active.tolist():
            at = np.flatnonzero(token_slots == slot)
            if at[-1] - at[0] + 1 == len(at):  # contiguous: views, no gather
                runs.append((slot, (int(at[0]), int(at[-1]) + 1)))
            else:
                runs.append((slot, torch.from_numpy(at).to(self.device)))
                gathers += 1
        n, used = len(token_slots), int((token_slots >= 0).sum())
        masked = _CALLS_US + n * self.slots * _TOKEN_SLOT_US * self.rank / 16
        segments = _CALLS_US * len(runs) + _GATHER_US * gathers
        segments += used * _TOKEN_SLOT_US * self.rank / 16
        auto = "kernel" if self.kernel is not None else None
        self.mode = self.force or auto or ("segments" if segments < masked else "masked")
        self.runs, self._token_slots = runs, token_slots
        if self.mode == "kernel":
            self.blocks = TokenBlocks.of(token_slots)
        if self.mode == "masked":
            self._build_masks()

    def _build_masks(self) -> None:
        hit = torch.from_numpy(self._token_slots.astype(np.int64))[:, None] == torch.arange(
            self.slots
        )
        per_slot = (hit * self.scales[None, :]).to(self.dtype)  # [T, S]
        self.masks = {
            g: per_slot.repeat_interleave(g * self.rank, dim=1).to(self.device) for g in self.masks
        }

    def to_static(self, n: int, batch: int) -> None:
        """Masked mode over static buffers (their first `batch` rows): this step's masks
        for rows < n, zeros after (and for a step without adapter rows): what a CUDA
        graph replays over."""
        if self.mode in ("segments", "kernel"):
            self._build_masks()
            self.mode = "masked"
        for g in self.masks:
            buf = self.static.get(g)
            if buf is None or buf.shape[0] < batch:
                buf = self.static[g] = torch.zeros(
                    batch, g * self.slots * self.rank, dtype=self.dtype, device=self.device
                )
            current = self.masks[g] if self.mode == "masked" else None
            if current is None:
                buf[:n].zero_()
            else:
                buf[:n].copy_(current)
            buf[n:batch].zero_()
            self.masks[g] = buf[:batch]
        self.mode = "masked"

    def repack(self, group: _Group, slot: int | None = None) -> None:
        """GEMM modules over `group`'s weights: all slots', and one slot's (None: every)."""
        group.shrink, group.expand = _gemm(group.a, self.pack), _gemm(group.b, self.pack)
        width = group.a.shape[0] // self.slots
        if not group.slot_shrink:
            group.slot_shrink = [None] * self.slots
            group.slot_expand = [None] * self.slots
        if self.kernel is not None and group.bt is None:
            offs = [0, *np.cumsum([rows for _, rows in group.row_offsets]).tolist()]
            group.offs = torch.tensor(offs, dtype=torch.int64)
            group.bt = torch.zeros(self.slots, self.rank * offs[-1], dtype=group.b.dtype)
        for s in range(self.slots) if slot is None else (slot,):
            cols = slice(s * width, (s + 1) * width)
            scaled = group.b[:, cols].float() * float(self.scales[s])
            group.slot_shrink[s] = _gemm(group.a[cols].contiguous(), self.pack)
            group.slot_expand[s] = _gemm(scaled.to(group.b.dtype).contiguous(), self.pack)
            if group.bt is not None:  # sub i's block: its rows' columns, transposed
                r = self.rank
                for i, (row, rows) in enumerate(group.row_offsets):
                    block = scaled[row : row + rows, i * r : (i + 1) * r].t()
                    group.bt[s, r * row : r * (row + rows)] = block.reshape(-1)


class LoraLinear(nn.Module):
    """A projection (dense, packed or quantized) plus its layer's adapters."""

    def __init__(self, base: nn.Module, group: _Group, subs: int, state: LoraState) -> None:
        super().__init__()
        self.base = base
        self.group = group
        self.subs = subs
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        mode = self.state.mode
        if mode is None:
            return y
        flat, out = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        g = self.group
        if mode == "masked":
            out.add_(g.expand(g.shrink(flat).mul_(self.state.masks[self.subs])))
            return y
        if mode == "kernel":
            st = self.state
            flat = flat if flat.stride(1) == 1 else flat.contiguous()
            st.kernel(flat, st.blocks, g.a, g.bt, self.subs, st.rank, g.offs, out)
            return y
        for slot, rows in self.state.runs:
            if isinstance(rows, tuple):
                a, b = rows
                out[a:b].add_(g.slot_expand[slot](g.slot_shrink[slot](flat[a:b])))
            else:
                delta = g.slot_expand[slot](g.slot_shrink[slot](flat.index_select(0, rows)))
                out.index_add_(0, rows, delta)
        return y


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
        kernel: LoraKernel | str | None = "auto",  # tests: a given one (or none)
    ) -> None:
        self.specs = specs
        pack = packing_applies(dtype, device)
        self.state = LoraState(slots, rank, dtype, device, pack, kernel)
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
        st = self.state
        n_in = shapes[subs[0]][0] // (tp.size if subs[0] in _ROW_PARALLEL else 1)
        outs = [shapes[s][1] // (1 if s in _ROW_PARALLEL else tp.size) for s in subs]
        offsets = [(sum(outs[:i]), o) for i, o in enumerate(outs)]
        columns = st.slots * len(subs) * st.rank
        a = torch.zeros(columns, n_in, dtype=st.dtype, device=st.device)
        b = torch.zeros(sum(outs), columns, dtype=st.dtype, device=st.device)
        return _Group(a, b, offsets)

    def apply(self, lora: LoraColumns | None, query_lens: np.ndarray) -> None:
        """The plan's slot loads, then how this step runs."""
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
        rank = self.state.rank
        self.state.scales[slot] = spec.scale
        for layer, groups in enumerate(self.layers):
            for name, group in groups.items():
                subs = GROUPS[name][1]
                for i, sub in enumerate(subs):
                    row, rows = group.row_offsets[i]
                    at = (slot * len(subs) + i) * rank  # slot `slot`, sub i's columns
                    group.a[at : at + rank].zero_()  # a lower rank leaves zeros after it
                    group.b[row : row + rows, at : at + rank].zero_()
                    if (pair := weights.get((layer, sub))) is not None:
                        group.a[at : at + spec.rank].copy_(pair[0])
                        group.b[row : row + rows, at : at + spec.rank].copy_(pair[1])
                self.state.repack(group, slot)
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
