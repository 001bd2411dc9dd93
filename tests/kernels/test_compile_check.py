"""The Triton kernels compile for Ampere (sm_80) and Hopper (sm_90), no GPU needed.

The interpreter tests check what the kernels compute; this checks what only the real
compiler sees: every launch the executor makes, for the bundled model, Llama-3.1-8B
and GQA 1/8 shapes, in bf16 and fp32, builds a cubin with no register spills and
within the GPU's shared memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tgi_mp.kernels.triton_attention import decode_splits
from tgi_mp.options import DEFAULT_CUDA_GRAPHS
from tools.compile_check import SHAPES

pytestmark = pytest.mark.kernels

ARCHS = (80, 90)
DTYPES = ("bfloat16", "float32")
KERNELS = {"_write_kv_kernel", "_varlen_kernel", "_decode_split_kernel", "_merge_splits_kernel"}


@pytest.fixture(scope="module")
def builds() -> list[dict]:
    # Interpreted kernels cannot be compiled: the children run without TRITON_INTERPRET.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, "-m", "tools.compile_check", "--json"]
    cmd += [arg for dtype in DTYPES for arg in ("--dtype", dtype)]
    # One child per architecture, side by side: compiling is CPU-bound and single-threaded.
    children = [
        subprocess.Popen(
            [*cmd, "--arch", str(arch)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=Path(__file__).parents[2],  # `tools` is a folder of the repository
        )
        for arch in ARCHS
    ]
    lines = []
    for child in children:
        out, err = child.communicate(timeout=600)
        assert child.returncode == 0, out[-3000:] + err[-3000:]
        lines += out.splitlines()
    return [json.loads(line) for line in lines]


def test_every_kernel_builds_for_every_model_shape_and_arch(builds: list[dict]) -> None:
    cases = {f"{name} {dtype}" for name, *_ in SHAPES for dtype in DTYPES}
    for arch in ARCHS:
        for case in cases:
            built = {b["kernel"] for b in builds if b["arch"] == arch and b["case"] == case}
            assert built == KERNELS, (arch, case)

    # Every split count a captured decode batch size uses is a variant of its own.
    for name, _, kv_heads, _ in SHAPES:
        splits = {decode_splits(b, kv_heads) for b in DEFAULT_CUDA_GRAPHS}
        assert splits == {1, 2, 4, 8, 16}
        for arch in ARCHS:
            merges = [
                b
                for b in builds
                if b["kernel"] == "_merge_splits_kernel"
                and b["arch"] == arch
                and b["case"].startswith(name + " ")
            ]
            assert len(merges) == len(splits) * len(DTYPES), (arch, name)


def test_builds_fit_the_gpu_without_spills(builds: list[dict]) -> None:
    for b in builds:
        assert b["fits"], b
        assert b["spill_bytes"] == 0, b
        assert 0 < b["registers"] <= 255, b
