"""Fill a model from safetensors (HF directory) or a GGUF file.

Both readers yield `(hf_name, tensor)` one tensor at a time; `_Sink` copies each
into its slice of our (possibly fused) parameter, so peak memory is the model
plus one checkpoint tensor, never two models.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tgi_mp.executor.models import build_model
from tgi_mp.executor.packed import pack_model, packing_applies
from tgi_mp.executor.parallel import SINGLE, TensorParallel
from tgi_mp.executor.quant import GroupQuantized, quantize_model
from tgi_mp.kernels.backends import TORCH_ATTENTION, AttentionBackend
from tgi_mp.model_source import ModelConfig, ModelSource

log = logging.getLogger("tgi_mp.executor")

ProgressFn = Callable[[int, int], None]
# GGUF block types whose bits an int4 linear takes as they are (quant.GroupQuantized).
_SHIPPED_4BIT = ("Q4_0", "Q4_1")

# HF projection -> (our fused projection, shard index)
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_PROJECTIONS = {*_FUSED, "o_proj", "down_proj"}  # the linears --quantize replaces
# llama.cpp block tensor -> HF module path inside `model.layers.N`
_GGUF_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


# Tensor-parallel splits: HF projection -> the dimension each rank takes a share of.
_ROW_SPLIT = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}  # output rows (dim 0)
_COLUMN_SPLIT = {"o_proj", "down_proj"}  # input columns (dim 1) of the weight


class Slicer:
    """What of each checkpoint tensor this rank loads: (dim, start, stop), or None for all."""

    def __init__(self, tp: TensorParallel) -> None:
        self.tp = tp

    def __call__(self, hf_name: str, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        if self.tp.size == 1:
            return None
        *_, module, kind = hf_name.split(".")
        if module in _ROW_SPLIT:
            return (0, *self.tp.share(shape[0]))
        if module in _COLUMN_SPLIT and kind == "weight":
            return (1, *self.tp.share(shape[1]))
        return None


class _Sink:
    """Routes HF-named tensors into the model's parameters; checks completeness."""

    def __init__(self, model: nn.Module, cfg: ModelConfig, tp: TensorParallel) -> None:
        self.params = dict(model.named_parameters())
        self.cfg = cfg
        self.tp = tp
        q, kv, inter = (
            cfg.num_heads // tp.size * cfg.head_dim,
            cfg.num_kv_heads // tp.size * cfg.head_dim,
            cfg.intermediate_size // tp.size,
        )
        # (row offset, rows) of each shard inside a fused parameter
        self.shards = {
            "qkv_proj": [(0, q), (q, kv), (q + kv, kv)],
            "gate_up_proj": [(0, inter), (inter, inter)],
        }
        self.expected = {
            (name, i)
            for name in self.params
            for i in range(len(self.shards.get(name.split(".")[-2], [None])))
        }
        self.loaded: set[tuple[str, int]] = set()
        # Module path -> its shards' 4-bit weights as shipped (see quant.quantize_model).
        self.shipped: dict[str, list[GroupQuantized | None]] = {}

    def put(self, hf_name: str, tensor: torch.Tensor | GroupQuantized) -> None:
        if hf_name.endswith("rotary_emb.inv_freq"):  # recomputed from the config
            return
        if hf_name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return  # some tied checkpoints still store a copy
        *path, module, kind = hf_name.split(".")
        shard = 0
        if module in _FUSED:
            module, shard = _FUSED[module]
        name = ".".join([*path, module, kind])
        param = self.params.get(name)
        if param is None:
            raise KeyError(f"checkpoint tensor {hf_name!r} has no place in {self.cfg.architecture}")
        target = self._shard(param, module, shard)
        if module in _COLUMN_SPLIT and kind == "bias" and self.tp.rank != 0:
            tensor = torch.zeros_like(tensor)  # added once, by rank 0, before the all-reduce
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(
                f"{hf_name}: checkpoint shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
            )
        if isinstance(tensor, GroupQuantized):
            path_name = ".".join([*path, module])
            shards = self.shipped.setdefault(path_name, [None] * len(self.shards.get(module, [0])))
            shards[shard] = tensor
        else:
            target.copy_(tensor)  # casts to the model dtype / device
        self.loaded.add((name, shard))

    def fill(self, module_path: str, shard: int, rows: torch.Tensor) -> None:
        """Writes float rows into one shard of a projection's weight."""
        param = self.params[f"{module_path}.weight"]
        self._shard(param, module_path.rsplit(".", 1)[-1], shard).copy_(rows)

    def _shard(self, param: nn.Parameter, module: str, shard: int) -> torch.Tensor:
        """The rows of `param` that shard `shard` of a fused projection owns (all, if
        `module` is not fused)."""
        if module not in self.shards:
            return param.data
        start, rows = self.shards[module][shard]
        return param.data[start : start + rows]

    def check(self) -> None:
        missing = sorted(f"{n}[{i}]" if i else n for n, i in self.expected - self.loaded)
        if missing:
            more = f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
            raise ValueError(f"checkpoint lacks weights: {', '.join(missing[:8])}{more}")


def _safetensors_tensors(
    directory: str, slicer: Slicer
) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
    from safetensors import safe_open

    index = Path(directory, "model.safetensors.index.json")
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {directory} (.bin is not supported)")
    total = 0
    for f in files:
        with safe_open(str(Path(directory, f)), framework="pt") as st:
            total += len(st.keys())

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for f in files:
            with safe_open(str(Path(directory, f)), framework="pt") as st:
                for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                    part = st.get_slice(name)
                    cut = slicer(name, tuple(part.get_shape()))
                    if cut is None:
                        yield name, st.get_tensor(name)
                    elif cut[0] == 0:  # reads only these rows from the file
                        yield name, part[cut[1] : cut[2]]
                    else:
                        yield name, part[:, cut[1] : cut[2]]

    return total, tensors()


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (see `_gguf_tensors`).

    In a GGUF, row `2*i + j` of each head holds HF row `j * head_dim/2 + i`
    (j = 0, 1; i < head_dim/2): the two halves HF's rotate_half pairs up are
    interleaved so that ggml's rope can rotate adjacent rows instead.
    """
    return w.reshape(n_heads, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(
    path: str, cfg: ModelConfig, slicer: Slicer, keep_4bit: bool = False
) -> tuple[int, Iterator[tuple[str, torch.Tensor | GroupQuantized]]]:
    """`keep_4bit`: the projections' Q4_0 / Q4_1 weights come as `GroupQuantized`,
    their bits untouched; everything else is dequantised to float32."""
    from gguf.quants import dequantize

    from tgi_mp.gguf_file import GGUFFile

    reader = GGUFFile(path)
    arch = reader.fields["general.architecture"]
    # Only llama.cpp's "llama" converter permutes q/k (its rope is the
    # adjacent-pairs kind); qwen2 uses neox rope and stores HF's layout.
    permuted = arch == "llama"
    tensors = [t for t in reader.tensors if t.name != "rope_freqs.weight"]  # read by the config

    def hf_name(name: str) -> str:
        if name in _GGUF_TOP:
            return _GGUF_TOP[name]
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
        if m is None or m[2] not in _GGUF_BLOCK:
            raise KeyError(f"unknown GGUF tensor {name!r}")
        return f"model.layers.{m[1]}.{_GGUF_BLOCK[m[2]]}.{m[3]}"

    def rope_heads(name: str) -> int | None:
        """The head count of a permuted q/k tensor (whole heads per rank), else None."""
        if not permuted:
            return None
        tp = slicer.tp.size
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            return cfg.num_heads // tp
        if name.endswith(("k_proj.weight", "k_proj.bias")):
            return cfg.num_kv_heads // tp
        return None

    def shipped(name: str, t, shape: tuple[int, ...]) -> GroupQuantized | None:
        """The tensor's own 4-bit blocks, this rank's share, HF's row order; None if the
        tensor is not a 4-bit projection weight or the share splits its blocks."""
        kind = t.tensor_type.name
        module = name.rsplit(".", 2)[-2]
        if not keep_4bit or kind not in _SHIPPED_4BIT or not name.endswith(".weight"):
            return None
        if module not in _PROJECTIONS:
            return None
        cut = slicer(name, shape)
        if cut is not None and cut[0] == 1 and (cut[1] % 32 or cut[2] % 32):
            return None
        q = GroupQuantized.from_gguf(np.asarray(t.data), kind, shape)  # type: ignore[arg-type]
        if cut is not None and cut[0] == 0:
            q = q.rows(slice(cut[1], cut[2]))
        elif cut is not None:
            q = q.columns(cut[1], cut[2])
        heads = rope_heads(name)
        if heads is not None:
            q = q.rows(torch.from_numpy(unpermute_rope_rows(np.arange(q.shape[0]), heads)))
        return q

    def gen() -> Iterator[tuple[str, torch.Tensor | GroupQuantized]]:
        for t in tensors:
            # ggml lists dims fastest-first: reversed, they are numpy/torch's shape.
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            name = hf_name(t.name)
            q = shipped(name, t, shape)
            if q is not None:
                yield name, q
                continue
            cut = slicer(name, shape)
            data = t.data
            if cut is not None and cut[0] == 0:
                # Quantised blocks run along rows: whole rows dequantise on their own.
                data = data.reshape(shape[0], -1)[cut[1] : cut[2]]
                shape = (cut[2] - cut[1], *shape[1:])
            w = dequantize(data, t.tensor_type).reshape(shape)
            if cut is not None and cut[0] == 1:
                w = np.ascontiguousarray(w[:, cut[1] : cut[2]])
            heads = rope_heads(name)  # whole heads per rank: the permutation stays inside
            if heads is not None:
                w = unpermute_rope_rows(w, heads)
            if not w.flags.writeable:  # F32 tensors are views of the read-only mmap
                w = w.copy()
            yield name, torch.from_numpy(w)

    return len(tensors), gen()


@torch.no_grad()  # not inference_mode: its tensors would be unusable outside it
def load_model(
    source: ModelSource,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    on_progress: ProgressFn | None = None,
    tp: TensorParallel = SINGLE,
    dummy: bool = False,
    attention: AttentionBackend = TORCH_ATTENTION,
    quantize: str | None = None,
    pack: bool = True,
    pack_float32: bool = False,
) -> nn.Module:
    """Build the model for `cfg` and load its weights (float32 GGUF dequantisation,
    then cast to `dtype`): with tensor parallelism, only this rank's slices.
    `on_progress(done, total)` is called per tensor. `quantize`: a `--quantize`
    method; int4 / gguf take a GGUF's 4-bit projection weights as shipped. `pack`:
    bf16 linears packed for oneDNN on the CPU (`executor/packed.py`); `pack_float32`:
    float32 ones too, where oneDNN is the faster (the executors). The attention
    backend may bring fused layer ops (the C++ CPU backend does, for bf16)."""
    model = build_model(cfg, dtype, device, tp, attention)
    if dummy:  # --load-format dummy: the config alone, no checkpoint read
        init_dummy_weights(model, seed=tp.rank)
        if quantize is not None:
            _log_quantized(quantize, tp, quantize_model(model, quantize))
        return _finish(model, dtype, device, attention, pack, pack_float32)
    slicer = Slicer(tp)
    if source.kind == "hf":
        total, tensors = _safetensors_tensors(source.path, slicer)
    elif source.kind == "gguf":
        keep = quantize in ("int4", "gguf")
        total, tensors = _gguf_tensors(source.gguf_path, cfg, slicer, keep_4bit=keep)
    else:
        raise ValueError(f"unknown model source kind {source.kind!r}")
    sink = _Sink(model, cfg, tp)
    for done, (name, tensor) in enumerate(tensors, 1):
        sink.put(name, tensor)
        if on_progress is not None:
            on_progress(done, total)
    sink.check()
    if quantize is not None:
        _log_quantized(quantize, tp, quantize_model(model, quantize, sink.shipped, sink.fill))
    return _finish(model, dtype, device, attention, pack, pack_float32)


def _finish(
    model: nn.Module,
    dtype: torch.dtype,
    device: torch.device | str,
    attention: AttentionBackend,
    pack: bool,
    pack_float32: bool = False,
) -> nn.Module:
    """The loaded model's fast paths: packed bf16 linears, the backend's fused layer ops."""
    device = torch.device(device)
    if pack and packing_applies(dtype, device, pack_float32):
        why = "" if dtype == torch.bfloat16 else " (faster than MKL's sgemm on this CPU)"
        name = str(dtype).removeprefix("torch.")
        log.info("%d %s linears packed for oneDNN%s", pack_model(model), name, why)
    ops = attention.layer_ops(model, dtype, device)
    if ops is not None:
        model.use_ops(ops)
        log.info("layer norms, RoPE and SiLU·mul fused (%s)", type(ops).__name__)
    return model


def _log_quantized(method: str, tp: TensorParallel, sizes: tuple[int, int]) -> None:
    log.info(
        "rank %d: %s weights, linears %.0f MB -> %.0f MB",
        tp.rank,
        method,
        *(b / 1e6 for b in sizes),
    )


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights (`--load-format dummy`): N(0, 0.02), norms at 1, biases at 0."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model
