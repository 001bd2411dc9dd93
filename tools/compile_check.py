"""Compile the Triton kernels for NVIDIA GPUs on a machine that has none.

Triton's interpreter (how CI runs the kernels) checks what they compute, not that
they compile: constexpr rules, loop-carried types, shared-memory and register limits
only show up in the real compiler. Triton ships LLVM and ptxas, which build a cubin
for any architecture without a driver. So each launcher of `triton_attention` is run
over "meta" tensors (shapes and dtypes, no memory) with its kernel call routed to
`JITFunction.warmup` under a driver that only names the target, and each build's
registers, local memory (spills) and shared memory are read back with cuobjdump.

    python -m tools.compile_check --arch 80 --arch 90

Run without TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from tgi_mp.kernels import triton_attention as ta
from tgi_mp.options import DEFAULT_CUDA_GRAPHS

_KERNELS = ("_write_kv_kernel", "_varlen_kernel", "_decode_split_kernel", "_merge_splits_kernel")
# Largest shared memory one block may opt into, per compute capability (CUDA guide).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

# (name, query heads, KV heads, head_dim): the bundled model, Llama-3.1-8B and the
# GQA ratios the kernel tests cover.
SHAPES = [
    ("smollm2-135m", 9, 3, 64),
    ("llama-3.1-8b", 32, 8, 128),
    ("mha", 16, 16, 128),
    ("gqa8", 64, 8, 128),
]


@dataclasses.dataclass(frozen=True)
class Build:
    """One compiled kernel variant and the resources it needs."""

    kernel: str
    case: str
    launch: str
    arch: int
    registers: int
    spill_bytes: int
    shared_bytes: int

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= SHARED_LIMIT.get(self.arch, SHARED_LIMIT[80])


class _TargetOnlyDriver:
    """The part of Triton's driver interface that compiling uses: no device, no stream.
    The device id is the architecture, so each target gets its own compile cache."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return self.target.arch

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def is_active(self) -> bool:
        return True


class _Compile:
    """Stands in for a kernel in the launcher: `kernel[grid](*args)` compiles instead."""

    def __init__(self, fn: triton.JITFunction, out: list) -> None:
        self.fn, self.out = fn, out

    def __getitem__(self, grid: tuple):
        def launch(*args, **constexprs):
            dtypes = (a.dtype if isinstance(a, torch.Tensor) else a for a in args)
            self.out.append((self.fn.__name__, self.fn.warmup(*dtypes, grid=grid, **constexprs)))

        return launch


@contextlib.contextmanager
def _compiling_for(arch: int, out: list) -> Iterator[None]:
    saved = {name: getattr(ta, name) for name in _KERNELS}
    if not all(isinstance(fn, triton.runtime.JITFunction) for fn in saved.values()):
        raise RuntimeError("kernels are interpreted (TRITON_INTERPRET=1): cannot compile them")
    # Read without `driver.active`, which raises when no GPU driver is found; the
    # attribute is `_active` (a property's store) in Triton >= 3.3, `active` before.
    previous = vars(driver).get("_active", vars(driver).get("active"))
    driver.set_active(_TargetOnlyDriver(arch))
    for name, fn in saved.items():
        setattr(ta, name, _Compile(fn, out))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(ta, name, fn)
        driver.set_active(previous)


def _launches(heads: int, kv_heads: int, dim: int, dtype: torch.dtype) -> Iterator[str]:
    """Every launcher as the executor calls it, yielding a label after each step: K/V
    rows are strided views of a fused QKV output; prefill with one and with several
    sequences (Triton specializes an int argument of 1); decode at every default CUDA
    graph batch size (each split count from 16 down to 1)."""
    meta = {"device": "meta", "dtype": dtype}
    index = {"device": "meta", "dtype": torch.int64}
    cache = torch.empty(64, 16, kv_heads, dim, **meta)
    for tokens, seqs in ((40, 1), (300, 5)):
        qkv = torch.empty(tokens, heads + 2 * kv_heads, dim, **meta)
        q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
        ta.write_kv(k, v, cache, cache, torch.empty(tokens, **index))
        starts, lens = torch.empty(seqs + 1, **index), torch.empty(seqs, **index)
        ta.varlen_attention(q, cache, cache, starts, lens, torch.empty(seqs, 8, **index), 0.1)
        yield f"prefill {seqs} seq"
    for batch in DEFAULT_CUDA_GRAPHS:
        q = torch.empty(batch, heads, dim, **meta)
        lens, tables = torch.empty(batch, **index), torch.empty(batch, 8, **index)
        ta.decode_attention(q, cache, cache, lens, tables, 0.1)
        yield f"decode batch {batch}"


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local-memory bytes: spills) from cuobjdump's report."""
    import triton.backends.nvidia as nvidia

    cuobjdump = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        cmd = [str(cuobjdump), "--dump-resource-usage", str(path)]
        report = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|LOCAL):(\d+)", report))
    return int(usage["REG"]), int(usage["LOCAL"])


def compile_all(archs: list[int], dtypes: list[torch.dtype]) -> list[Build]:
    """Compile every kernel variant the launchers produce for these models, per target."""
    builds: list[Build] = []
    for arch in archs:
        for name, heads, kv_heads, dim in SHAPES:
            for dtype in dtypes:
                case = f"{name} {str(dtype).removeprefix('torch.')}"
                out: list = []
                seen: set[str] = set()
                with _compiling_for(arch, out):
                    for launch in _launches(heads, kv_heads, dim, dtype):
                        for kernel_name, kernel in out:
                            if kernel.hash in seen:  # a variant an earlier launch built
                                continue
                            seen.add(kernel.hash)
                            regs, spill = _resources(kernel.asm["cubin"])
                            shared = kernel.metadata.shared
                            builds.append(
                                Build(kernel_name, case, launch, arch, regs, spill, shared)
                            )
                        out.clear()
    return builds


@click.command()
@click.option("--arch", "archs", type=int, multiple=True, default=(80, 90), show_default=True)
@click.option(
    "--dtype", "dtypes", type=click.Choice(["bfloat16", "float16", "float32"]),
    multiple=True, default=("bfloat16",), show_default=True,
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="One JSON object per build.")
def main(archs: tuple[int, ...], dtypes: tuple[str, ...], as_json: bool) -> None:
    """Compile the Triton kernels for these compute capabilities and print each build's
    registers, spilled bytes and shared memory; exit 1 if one needs more shared memory
    than the GPU has."""
    builds = compile_all(list(archs), [getattr(torch, d) for d in dtypes])
    if not as_json:
        print(f"arch  {'case':<22} {'launch':<16} {'kernel':<21} regs spill   smem")
    for b in builds:
        if as_json:
            print(json.dumps(dataclasses.asdict(b) | {"fits": b.fits}))
            continue
        flag = "" if b.fits and not b.spill_bytes else "  <-- check"
        print(
            f"{b.arch:>4}  {b.case:<22} {b.launch:<16} {b.kernel:<21} {b.registers:>4} "
            f"{b.spill_bytes:>5} {b.shared_bytes:>6}{flag}"
        )
    sys.exit(0 if all(b.fits for b in builds) else 1)


if __name__ == "__main__":
    main()
