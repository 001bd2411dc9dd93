"""The CPU paged-attention kernel (`cpu_attention.cpp`): built once per source, compiler
and torch version into a cache directory, loaded with ctypes.

Plain `c++` with torch's headers (for `at::parallel_for`, so the kernel shares torch's
OpenMP threads) builds it in about a second; no pybind, no ninja. The build is keyed
by a hash, written to a temporary name and renamed into place, so executors starting
together never load a half-written library.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class KernelUnavailable(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("TGI_MP_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tgi-mp", "kernels"
    )
    return Path(root)


def _compile_command(compiler: str, source: Path, target: Path) -> list[str]:
    torch_dir = Path(torch.__file__).parent
    abi = int(torch.compiled_with_cxx11_abi())
    return [
        compiler, "-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{torch_dir / 'include'}",
        str(source), "-o", str(target),
        f"-L{torch_dir / 'lib'}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}",
    ]  # fmt: skip


def build() -> Path:
    """The compiled library's path, building it if this source has not been built."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        raise KernelUnavailable(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join(_compile_command(compiler, SOURCE, Path("-"))).encode())
    key.update(torch.__version__.encode())
    target = cache_dir() / f"cpu_attention-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run(
            _compile_command(compiler, SOURCE, Path(tmp)), capture_output=True, text=True
        )
        if done.returncode:
            raise KernelUnavailable(f"building {SOURCE.name} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@cache
def library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build()))
    lib.tgi_cpu_paged_attention.restype = ctypes.c_int
    lib.tgi_cpu_paged_attention.argtypes = [
        ctypes.c_int, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR,
        _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_float,
    ]  # fmt: skip
    lib.tgi_cpu_attention_has_fast_path.restype = ctypes.c_int
    return lib


def fast_path_available() -> bool:
    """The AVX512_BF16 path: built in (x86-64) and supported by this CPU."""
    return bool(library().tgi_cpu_attention_has_fast_path()) and (
        torch.cpu._is_avx512_bf16_supported()
    )


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    fast: bool,
) -> torch.Tensor:
    """Causal attention of `q` `[T, H, D]` (bf16) over the bf16 paged cache
    `[blocks, block_size, KVH, D]`, as `kernels.attention.paged_attention`."""
    if q.dtype != torch.bfloat16 or k_cache.dtype != torch.bfloat16:
        raise KernelUnavailable(f"the CPU kernel takes bfloat16, not {q.dtype}/{k_cache.dtype}")
    if q.stride(-1) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise KernelUnavailable("the CPU kernel needs unit-stride head dims and contiguous caches")
    if any(x.dtype != torch.int64 for x in (query_start, seq_lens, block_tables)):
        raise KernelUnavailable("the CPU kernel reads int64 metadata")
    t, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    out = torch.empty((t, heads, dim), dtype=q.dtype)
    query_start, seq_lens = query_start.contiguous(), seq_lens.contiguous()
    tables = block_tables.contiguous()
    status = library().tgi_cpu_paged_attention(
        int(fast), q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(),
        v_cache.data_ptr(), out.data_ptr(), query_start.data_ptr(), seq_lens.data_ptr(),
        tables.data_ptr(), tables.shape[1], seq_lens.shape[0], heads, kv_heads, dim,
        block_size, scale,
    )  # fmt: skip
    if status:
        raise KernelUnavailable(
            f"the CPU kernel does not take heads={heads}, kv_heads={kv_heads}, head_dim={dim}"
        )
    return out
