"""Find LoRA adapters on disk and check them against the base model (`--lora-adapters`).

A PEFT LoRA adapter is a directory with `adapter_config.json` and
`adapter_model.safetensors`. Everything is checked here, in the launcher, before
any process starts: the config's kind and options, then every tensor's name and
shape from the safetensors header alone (no weights read), so a bad adapter stops
the start with a message naming the file and the problem. The executors read the
weights (`executor/lora.py`). Like `model_source`, this module never imports torch.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path

import msgspec

from tgi_mp import hub
from tgi_mp.model_source import ModelConfig, _hub_cache_dir

# The decoder projections an adapter may target, in the order the executors stack them.
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT's key: [base_model.model.]model.layers.N.(self_attn|mlp).<proj>.lora_(A|B)[.name].weight
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\."
    r"(\w+?)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)
# PEFT options that change the maths (or add weights) beyond y = Wx + s·B(Ax).
_REFUSED = {
    "use_dora": "DoRA (use_dora) adapters",
    "modules_to_save": "adapters that also train whole modules (modules_to_save)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "fan_in_fan_out": "fan_in_fan_out weights (GPT-2-style Conv1D layers)",
}


class AdapterError(ValueError):
    """A LoRA adapter that cannot be served; the message names the file and the problem."""


class LoraSpec(msgspec.Struct, frozen=True):
    """One adapter, checked: what every process needs to know of it."""

    name: str  # what requests call it: `adapter_id`, the OpenAI `model`
    path: str  # the directory with its config and weights
    rank: int
    scale: float  # lora_alpha / r (rsLoRA: lora_alpha / sqrt(r))
    modules: tuple[str, ...]  # the projections it adapts, a subset of LORA_MODULES

    @property
    def weights_path(self) -> str:
        return os.path.join(self.path, WEIGHTS_FILE)


def parse_adapters(value: str | Iterable[str] | None) -> tuple[tuple[str, str], ...]:
    """TGI's `--lora-adapters`: `name=path` or a bare id (`id` or `id@revision`, named
    by the id), comma-separated
    (or given several times) -> ((name, path or id), ...)."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    pairs: list[tuple[str, str]] = []
    for item in ",".join(items).split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, ref = item.partition("=")
        # A bare `id@revision` is named by its id (TGI's form).
        name, ref = (name.strip(), ref.strip()) if sep else (item.split("@")[0], item)
        if not name or not ref:
            raise ValueError(f"--lora-adapters: {item!r} is not `name=path` or an id")
        if name in (n for n, _ in pairs):
            raise ValueError(f"--lora-adapters: the name {name!r} is given twice")
        pairs.append((name, ref))
    return tuple(pairs)


def projection_shapes(mc: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection an adapter may target."""
    q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    h, inter = mc.hidden_size, mc.intermediate_size
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def resolve_adapters(
    pairs: Iterable[tuple[str, str]], mc: ModelConfig, max_rank: int | None
) -> tuple[LoraSpec, ...]:
    """Each (name, path or id) found and checked, in order."""
    if max_rank is not None and max_rank < 1:
        raise ValueError(f"--max-lora-rank must be at least 1, got {max_rank}")
    return tuple(check_adapter(name, _directory(ref), mc, max_rank) for name, ref in pairs)


def _directory(ref: str) -> Path:
    """A local directory, else a Hub id in the local cache (never downloaded here)."""
    local = Path(ref).expanduser()
    if local.is_dir():
        return local.resolve()
    if ref.startswith(("/", "./", "../", "~")):
        raise AdapterError(f"LoRA adapter directory {ref} does not exist")
    repo, _, revision = ref.partition("@")
    snapshot = hub.cached_snapshot(repo, revision or None, _hub_cache_dir())
    if snapshot is None:
        raise AdapterError(
            f"LoRA adapter {ref!r} is neither a local directory nor in the local Hugging Face "
            f"cache ({_hub_cache_dir() or 'default location'})"
        )
    return snapshot


def check_adapter(name: str, directory: Path, mc: ModelConfig, max_rank: int | None) -> LoraSpec:
    config_path = directory / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"LoRA adapter {name!r}: {config_path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"LoRA adapter {name!r}: {config_path} is not JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise AdapterError(f"{config_path}: peft_type {kind!r}, only LORA adapters are served")
    for key, what in _REFUSED.items():
        if config.get(key):
            raise AdapterError(f"{config_path}: {what} are not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{config_path}: bias {config['bias']!r} (trained biases) not supported")
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, int | float):
        raise AdapterError(f"{config_path}: `r` and `lora_alpha` must be numbers, r >= 1")
    if max_rank is not None and rank > max_rank:
        raise AdapterError(f"{config_path}: rank {rank} is above --max-lora-rank {max_rank}")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        bin_file = (
            " (only adapter_model.bin: pickle, not loaded)"
            if (directory / "adapter_model.bin").is_file()
            else ""
        )
        raise AdapterError(f"LoRA adapter {name!r}: {weights} is missing{bin_file}")
    modules = _check_tensors(weights, _header(weights), mc, rank)
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraSpec(name, str(directory), rank, float(scale), modules)


def _header(path: Path) -> dict[str, dict]:
    """The safetensors header: tensor name -> {dtype, shape, data_offsets}."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > os.path.getsize(path):
                raise ValueError("header longer than the file")
            header = json.loads(f.read(size))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not a safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header


def _check_tensors(
    path: Path, header: dict[str, dict], mc: ModelConfig, rank: int
) -> tuple[str, ...]:
    shapes = projection_shapes(mc)
    seen: dict[tuple[int, str], set[str]] = {}
    for key, info in header.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(
                f"{path}: tensor {key!r} is not a LoRA A/B weight of a decoder projection "
                f"({', '.join(LORA_MODULES)}); embeddings, the LM head and biases are not served"
            )
        layer, module, ab = int(m[1]), m[2], m[3]
        if module not in shapes:
            raise AdapterError(f"{path}: {key!r} targets {module!r}, which {mc.architecture} lacks")
        if layer >= mc.num_layers:
            raise AdapterError(
                f"{path}: {key!r} is for layer {layer}; the model has {mc.num_layers}"
            )
        n_in, n_out = shapes[module]
        want = [rank, n_in] if ab == "A" else [n_out, rank]
        if list(info.get("shape", [])) != want:
            raise AdapterError(
                f"{path}: {key!r} has shape {info.get('shape')}, expected {want} "
                f"(rank {rank} on this model's {module}): an adapter for another base model?"
            )
        seen.setdefault((layer, module), set()).add(ab)
    if not seen:
        raise AdapterError(f"{path}: no LoRA weights in it")
    half = [f"layer {lay} {mod}" for (lay, mod), ab in seen.items() if ab != {"A", "B"}]
    if half:
        raise AdapterError(f"{path}: A without B (or B without A) for {', '.join(half[:3])}")
    return tuple(m for m in LORA_MODULES if any(mod == m for _, mod in seen))
