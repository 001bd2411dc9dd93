"""Our C++ CPU kernels (`*.cpp` and the `*.h` they share, beside this file): each built
once per source, compiler and torch version into a cache directory, loaded with ctypes.

Plain `c++` with torch's headers (for `at::parallel_for`, so the kernels share torch's
OpenMP threads) builds one in about a second; no pybind, no ninja. A build is keyed
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

I64, PTR, F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


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


def build(name: str) -> Path:
    """The compiled `name.cpp`'s path, building it if this source has not been built."""
    source = Path(__file__).with_name(f"{name}.cpp")
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        raise KernelUnavailable(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    key = hashlib.sha256()
    key.update(source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):  # what the sources include
        key.update(header.read_bytes())
    key.update(" ".join(_compile_command(compiler, source, Path("-"))).encode())
    key.update(torch.__version__.encode())
    target = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run(
            _compile_command(compiler, source, Path(tmp)), capture_output=True, text=True
        )
        if done.returncode:
            raise KernelUnavailable(f"building {source.name} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@cache
def library(name: str, signatures: tuple[tuple[str, type | None, tuple[type, ...]], ...]):
    """`name.cpp` loaded, its functions' (name, restype, argtypes) declared."""
    lib = ctypes.CDLL(str(build(name)))
    for fn, restype, argtypes in signatures:
        getattr(lib, fn).restype = restype
        getattr(lib, fn).argtypes = list(argtypes)
    return lib
