"""The configuration every tgi-mp process starts from.

The supervisor writes it once as msgpack into the instance's private IPC
directory; each child reads that file, so nothing is pickled even at spawn.
"""

from __future__ import annotations

import os

import msgspec

from tgi_mp.model_source import ModelConfig, ModelSource

# The values of the option-like fields (the CLI and perf scripts offer the same).
CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "device": ("auto", "cpu", "cuda"),
    "attention": ("auto", "torch", "triton", "flash-attn"),
    "load_format": ("auto", "dummy"),
}
# TGI's default --cuda-graphs: the decode batch sizes captured in CUDA graphs.
DEFAULT_CUDA_GRAPHS = (1, 2, 4, 8, 16, 32, 64, 128)


class EngineConfig(msgspec.Struct, frozen=True):
    model: ModelSource
    model_config: ModelConfig
    ipc_root: str
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on the CPU
    device: str = "auto"  # auto: CUDA when torch sees a GPU
    attention: str = "auto"  # auto: flash-attn if it passes its check, Triton on CUDA, torch
    # Decode batch sizes captured in CUDA graphs (TGI's --cuda-graphs); () disables.
    cuda_graphs: tuple[int, ...] = DEFAULT_CUDA_GRAPHS
    cuda_memory_fraction: float = 0.95  # of each GPU: weights + activations + KV cache
    num_shards: int = 1
    block_size: int = 16
    max_batch_prefill_tokens: int = 4096
    max_batch_total_tokens: int | None = None  # KV capacity; None = from the memory budget
    # The KV budget when max_batch_total_tokens is None: these bytes per executor, or
    # else this fraction of the memory available once the weights are loaded.
    kv_cache_memory: int | None = None
    kv_cache_fraction: float = 0.2
    max_batch_size: int | None = None  # sequences per step; None = up to the token budget
    torch_threads: int | None = None
    startup_timeout: float = 600.0
    prefix_caching: bool = True
    load_format: str = "auto"  # "dummy": random weights from the config alone (benchmarks)
    waiting_served_ratio: float | None = None  # TGI's batch-growth rule; None: off
    max_waiting_tokens: int = 20
    watermark_gamma: float = 0.5  # green share of the vocabulary for `watermark` requests
    watermark_delta: float = 2.0  # logit bias of green tokens

    def __post_init__(self) -> None:
        for name in ("num_shards", "block_size", "max_batch_prefill_tokens", "max_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.max_batch_size and self.max_batch_size > self.max_batch_prefill_tokens:
            # Every running request needs one token of the step budget to make progress.
            raise ValueError(
                f"max_batch_size ({self.max_batch_size}) must be <= "
                f"max_batch_prefill_tokens ({self.max_batch_prefill_tokens})"
            )
        check_divisible(self.model_config, self.num_shards)
        if not 0.0 < self.kv_cache_fraction <= 1.0:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        if not 0.0 < self.watermark_gamma < 1.0:
            raise ValueError(f"watermark_gamma must be in (0, 1), got {self.watermark_gamma}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
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


def parse_cuda_graphs(spec: str) -> tuple[int, ...]:
    """TGI's `--cuda-graphs` value: comma-separated batch sizes; `0` (or nothing) disables."""
    try:
        sizes = sorted({int(x) for x in spec.replace(" ", "").split(",") if x})
    except ValueError:
        raise ValueError(f"--cuda-graphs takes comma-separated batch sizes, got {spec!r}") from None
    if any(s < 0 for s in sizes):
        raise ValueError(f"--cuda-graphs sizes must be positive, got {spec!r}")
    return tuple(s for s in sizes if s > 0)
