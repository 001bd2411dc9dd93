"""Which device and dtype an executor runs on, and how much memory its KV cache gets."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from tgi_mp.config import EngineConfig


def resolve_device(requested: str, rank: int) -> torch.device:
    """`auto`: CUDA when present. Rank r of a tensor-parallel group takes GPU r."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":  # EngineConfig admits only auto, cpu and cuda
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device")
    if rank >= torch.cuda.device_count():
        visible = torch.cuda.device_count()
        raise RuntimeError(f"executor {rank} needs GPU {rank}, but {visible} are visible")
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


def native_bf16_isa() -> str | None:
    """The instructions this CPU multiplies bfloat16 with natively, or None (then bf16
    matmuls are emulated through float32, slower than float32 itself)."""
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512_BF16"
    return None


def resolve_dtype(requested: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype, and why. `auto`: bfloat16 on GPUs (what checkpoints ship in) and on
    CPUs with native bf16 matmuls (half the bytes per step); float32 on other CPUs."""
    if requested != "auto":
        return getattr(torch, requested), "--dtype"
    if device.type == "cuda":
        return torch.bfloat16, "auto on CUDA"
    isa = native_bf16_isa()
    if isa is not None:
        return torch.bfloat16, f"auto: this CPU has {isa}"
    return torch.float32, "auto: this CPU has no native bf16 matmul (AVX512_BF16 or AMX)"


def available_host_memory() -> int:
    """Bytes the kernel could give this process now without swapping (Linux's
    MemAvailable; free physical pages elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cuda_kv_budget(
    total: int, free: int, reserved: int, peak: int, fraction: float, graph_reserve: int
) -> int:
    """KV bytes on a GPU of `total` bytes, `free` of them free now, after a profiling
    forward at the largest step that peaked at `peak` allocated bytes (weights
    included) while torch held `reserved`. Other processes' memory (total - free -
    reserved) is never ours; of `fraction` of the device, what remains after the peak
    and the CUDA graphs' reserve is the cache. Never negative."""
    others = total - free - reserved
    return max(0, int(total * fraction) - others - peak - graph_reserve)


def profile_cuda_budget(
    cfg: EngineConfig, device: torch.device, forward: Callable[[], None], graph_reserve: int
) -> tuple[int, str]:
    """Runs `forward` (the biggest step the scheduler may plan) and sizes the KV cache
    from what is left, so that no later step runs out of memory: with the Triton
    kernels a step's peak is at most this one's. (The torch reference's padded K/V
    copies grow with context lengths, which no single profile step bounds.)"""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    forward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    budget = cuda_kv_budget(total, free, reserved, peak, cfg.cuda_memory_fraction, graph_reserve)
    return budget, (
        f"{cfg.cuda_memory_fraction:g} of {total / 2**30:.1f} GiB minus a "
        f"{peak / 2**30:.2f} GiB profiled peak (weights + a {cfg.step_tokens('cuda')}-token "
        f"step) and {graph_reserve / 2**20:.0f} MiB for CUDA graphs"
    )
