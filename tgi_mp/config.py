"""The configuration every tgi-mp process starts from.

The supervisor writes it once as msgpack into the instance's private IPC
directory; each child reads that file, so nothing is pickled even at spawn.
"""

from __future__ import annotations

import os

import msgspec

from tgi_mp.model_source import ModelConfig, ModelSource


class EngineConfig(msgspec.Struct, frozen=True):
    model: ModelSource
    model_config: ModelConfig
    ipc_root: str
    dtype: str = "float32"
    device: str = "cpu"
    num_shards: int = 1
    block_size: int = 16
    max_batch_prefill_tokens: int = 4096
    max_batch_total_tokens: int | None = None  # KV capacity; None = from the memory budget
    kv_cache_memory: int = 1 << 30  # bytes per executor when max_batch_total_tokens is None
    max_batch_size: int = 256
    torch_threads: int | None = None
    startup_timeout: float = 600.0

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
