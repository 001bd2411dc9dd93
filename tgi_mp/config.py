"""The configuration every tgi-mp process starts from.

The supervisor writes it once as msgpack into the instance's private IPC
directory; each child reads that file, so nothing is pickled even at spawn.
"""

from __future__ import annotations

import os

import msgspec

from tgi_mp.ipc.shm import RingSpec
from tgi_mp.lora_source import LoraSpec
from tgi_mp.model_source import ModelConfig, ModelSource
from tgi_mp.options import CHOICES, DEFAULTS, sequences_per_step, step_tokens


class EngineConfig(msgspec.Struct, frozen=True):
    """The engine's options (their defaults and help: `tgi_mp.options`) and what the
    launcher resolved: the model and the IPC directory."""

    model: ModelSource
    model_config: ModelConfig
    ipc_root: str
    dtype: str = DEFAULTS["dtype"]
    device: str = DEFAULTS["device"]
    attention: str = DEFAULTS["attention"]
    cuda_graphs: tuple[int, ...] = DEFAULTS["cuda_graphs"]
    cuda_memory_fraction: float = DEFAULTS["cuda_memory_fraction"]
    num_shards: int = DEFAULTS["num_shards"]
    block_size: int = 16
    max_batch_prefill_tokens: int | None = DEFAULTS["max_batch_prefill_tokens"]  # None: device's
    max_batch_total_tokens: int | None = DEFAULTS["max_batch_total_tokens"]
    kv_cache_memory: int | None = DEFAULTS["kv_cache_memory"]
    kv_cache_fraction: float = DEFAULTS["kv_cache_fraction"]
    max_batch_size: int | None = DEFAULTS["max_batch_size"]
    torch_threads: int | None = None
    startup_timeout: float = 600.0
    prefix_caching: bool = DEFAULTS["prefix_caching"]
    overlap_scheduling: bool = DEFAULTS["overlap_scheduling"]
    speculate: int = DEFAULTS["speculate"]
    speculate_ngram_max: int = DEFAULTS["speculate_ngram_max"]
    speculate_ngram_min: int = DEFAULTS["speculate_ngram_min"]
    speculate_max_batch: int = DEFAULTS["speculate_max_batch"]
    # A draft model for speculative decoding (`--speculative-model`, resolved by the
    # launcher): it proposes the tokens instead of n-gram lookup.
    draft_model: ModelSource | None = None
    draft_model_config: ModelConfig | None = None
    shared_memory: bool = DEFAULTS["shared_memory"]
    # LoRA adapters, found and checked by the launcher (`lora_source.resolve_adapters`).
    lora_adapters: tuple[LoraSpec, ...] = ()
    max_loras: int = DEFAULTS["max_loras"]
    max_lora_rank: int | None = DEFAULTS["max_lora_rank"]
    load_format: str = DEFAULTS["load_format"]
    quantize: str | None = DEFAULTS["quantize"]  # weight-only quantization method, or None
    waiting_served_ratio: float | None = DEFAULTS["waiting_served_ratio"]
    max_waiting_tokens: int = DEFAULTS["max_waiting_tokens"]
    watermark_gamma: float = DEFAULTS["watermark_gamma"]
    watermark_delta: float = DEFAULTS["watermark_delta"]
    # The directory with the model's tokenizer.json (the launcher exports it), for the
    # scheduler's grammar matchers; None: the model has no tokenizer (grammars refused).
    tokenizer_dir: str | None = None
    # The plan's shared-memory ring, made by the supervisor just before it starts the
    # children (who inherit its descriptor); None: plans travel as ZeroMQ frames.
    plan_ring: RingSpec | None = None

    def step_tokens(self, device_type: str) -> int:
        """The step's token budget on this device (`options.step_tokens`)."""
        return step_tokens(self.max_batch_prefill_tokens, device_type, self.max_batch_size)

    def sequences_per_step(self, device_type: str) -> int:
        return sequences_per_step(self.max_batch_size, self.step_tokens(device_type))

    @property
    def lora_slots(self) -> int:
        """Adapters resident at once (0: LoRA off)."""
        return min(self.max_loras, len(self.lora_adapters))

    @property
    def lora_rank(self) -> int:
        """Each slot's rank: adapters of a lower one are zero-padded."""
        return self.max_lora_rank or max((a.rank for a in self.lora_adapters), default=0)

    def __post_init__(self) -> None:
        for name in ("num_shards", "block_size", "max_batch_prefill_tokens", "max_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        budget = self.max_batch_prefill_tokens
        if self.max_batch_size and budget is not None and self.max_batch_size > budget:
            # Every running request needs one token of the step budget to make progress.
            raise ValueError(
                f"max_batch_size ({self.max_batch_size}) must be <= "
                f"max_batch_prefill_tokens ({self.max_batch_prefill_tokens})"
            )
        check_divisible(self.model_config, self.num_shards)
        if self.speculate < 0 or self.speculate_max_batch < 0:
            raise ValueError("speculate and speculate_max_batch must be >= 0")
        if not 1 <= self.speculate_ngram_min <= self.speculate_ngram_max:
            raise ValueError(
                "speculate_ngram_min must be >= 1 and <= speculate_ngram_max, got "
                f"{self.speculate_ngram_min} and {self.speculate_ngram_max}"
            )
        if self.draft_model_config is not None:
            check_draft(self.model_config, self.draft_model_config, self.speculate)
            check_divisible(self.draft_model_config, self.num_shards)
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {self.max_loras}")
        if not 0.0 < self.kv_cache_fraction <= 1.0:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        if not 0.0 < self.watermark_gamma < 1.0:
            raise ValueError(f"watermark_gamma must be in (0, 1), got {self.watermark_gamma}")
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed and not (name == "quantize" and value is None):
                raise ValueError(
                    f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.quantize == "gguf" and self.model.kind != "gguf":
            raise ValueError(
                f"--quantize gguf keeps a GGUF file's 4-bit weights: {self.model.model_id} "
                "is not a GGUF model (use int4 or int8 to quantize it at load)"
            )
        if any(b < 1 for b in self.cuda_graphs):
            raise ValueError(f"cuda_graphs batch sizes must be positive, got {self.cuda_graphs}")
        if not 0.0 < self.cuda_memory_fraction <= 1.0:
            raise ValueError(
                f"cuda_memory_fraction must be in (0, 1], got {self.cuda_memory_fraction}"
            )

    @property
    def path(self) -> str:
        return os.path.join(self.ipc_root, "config.msgpack")

    def save(self) -> str:
        with open(self.path, "wb") as f:
            f.write(msgspec.msgpack.encode(self))
        return self.path

    @classmethod
    def load(cls, path: str) -> EngineConfig:
        with open(path, "rb") as f:
            return msgspec.msgpack.decode(f.read(), type=cls)


def check_draft(target: ModelConfig, draft: ModelConfig, speculate: int) -> None:
    """A draft model proposes token ids the target reads as its own: one vocabulary."""
    if speculate < 1:
        raise ValueError("--speculative-model needs --speculate N (N >= 1 proposals a step)")
    if draft.vocab_size != target.vocab_size:
        raise ValueError(
            f"the draft model's vocabulary ({draft.vocab_size} tokens) is not the target's "
            f"({target.vocab_size}): a draft model must share the target's tokenizer"
        )
    if draft.max_position_embeddings < target.max_position_embeddings:
        raise ValueError(
            f"the draft model's context ({draft.max_position_embeddings} positions) is "
            f"shorter than the target's ({target.max_position_embeddings})"
        )


def check_divisible(mc: ModelConfig, n: int) -> None:
    """Refuses a shard count the model's heads or MLP cannot be split by."""
    if n == 1:
        return
    parts = {
        "attention heads": mc.num_heads,
        "KV heads": mc.num_kv_heads,
        "MLP intermediate size": mc.intermediate_size,
    }
    bad = [f"{v} {k}" for k, v in parts.items() if v % n]
    if bad:
        raise ValueError(
            f"--num-shard {n} cannot split {mc.architecture}: it has {mc.num_heads} attention "
            f"heads, {mc.num_kv_heads} KV heads and an MLP of {mc.intermediate_size}, and "
            f"{', '.join(bad)} do not divide by {n}"
        )
