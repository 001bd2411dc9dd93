"""The CPU attention kernel of another commit against the working tree's, in one run.

    python perf/bench_attention_ab.py 2fb55b9          # decode and chunk cases
    python perf/bench_attention_ab.py HEAD~3 --layers 30

The other commit's `kernels/cpu_attention.cpp` is built beside the current one (under
another name, in a temporary directory) and both run the same steps on the same
caches, alternately, `--rounds` times (medians). Each step runs over `--layers`
separate caches in turn, as a forward does, so their K/V have left the CPU's caches
when a layer reads them ("cold"); "hot" repeats one layer's. Outputs are compared
(the kernels' rewrites so far are bit-identical).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tgi_mp.kernels import cpu_attention, cpu_build
from tgi_mp.kernels.attention import AttentionMetadata, allocate_kv_cache

HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 16  # SmolLM2-135M
CASES = [  # (query lengths, cached lengths)
    ([1] * 32, [200] * 32),
    ([1] * 8, [1000] * 8),
    ([256], [1024]),
    ([64] * 4, [1024] * 4),
]


def _other_library(rev: str, where: Path):
    repo = Path(__file__).resolve().parents[1]
    for name in ("cpu_attention.cpp", "cpu_simd.h"):
        text = subprocess.run(
            ["git", "show", f"{rev}:kernels/{name}"], cwd=repo, check=True, capture_output=True
        ).stdout
        (where / name.replace("cpu_attention", "cpu_attention_other")).write_bytes(text)
    source = where / "cpu_attention_other.cpp"
    target = where / "cpu_attention_other.so"
    compiler = cpu_build.shutil.which("c++")
    subprocess.run(cpu_build._compile_command(compiler, source, target), check=True)
    lib = cpu_build.ctypes.CDLL(str(target))
    for fn, restype, argtypes in cpu_attention._SIGNATURES:
        getattr(lib, fn).restype = restype
        getattr(lib, fn).argtypes = list(argtypes)
    return lib


def _run(lib, q, k_cache, v_cache, meta) -> torch.Tensor:
    out = torch.empty_like(q)
    status = lib.tgi_cpu_paged_attention(
        1, q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
        out.data_ptr(), meta.query_start_loc.data_ptr(), meta.seq_lens.data_ptr(),
        meta.block_tables.data_ptr(), meta.block_tables.shape[1], meta.seq_lens.shape[0],
        HEADS, KV_HEADS, DIM, BLOCK, DIM**-0.5,
    )  # fmt: skip
    assert status == 0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rev", help="the other commit (git revision)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if not cpu_attention.fast_path_available():
        raise SystemExit("needs the AVX512_BF16 path")
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"other": _other_library(args.rev, Path(tmp)), "this": cpu_attention.library()}
        print(f"{args.rev} ('other') against the working tree ('this'), {args.layers} layers")
        print()
        print("| step | caches | other ms | this ms | this / other speed |")
        print("|---|---|---|---|---|")
        gen = torch.Generator().manual_seed(0)
        for query, cached in CASES:
            need = [-(-(q + c) // BLOCK) for q, c in zip(query, cached, strict=True)]
            perm = torch.randperm(sum(need), generator=gen).tolist()
            tables, at = [], 0
            for n in need:
                tables.append(perm[at : at + n] + [0] * (max(need) - n))
                at += n
            meta = AttentionMetadata.build(
                np.array(query, np.int32), np.array(cached, np.int32),
                np.array(tables, np.int32), BLOCK, "cpu", reference=False,
            )  # fmt: skip
            caches = allocate_kv_cache(
                args.layers, sum(need), BLOCK, KV_HEADS, DIM, torch.bfloat16, "cpu"
            )
            for k_cache, v_cache in caches:
                k_cache.normal_(generator=gen)
                v_cache.normal_(generator=gen)
            q = 2 * torch.randn(sum(query), HEADS + 2 * KV_HEADS, DIM, generator=gen)
            q = q.bfloat16()[:, :HEADS]
            a, b = (_run(libs[n], q, *caches[0], meta) for n in ("other", "this"))
            assert torch.equal(a, b), "the two kernels' outputs differ"
            name = f"{len(query)} x {query[0]} over {cached[0]}"
            for mode in ("cold", "hot"):
                layers = caches if mode == "cold" else [caches[0]] * args.layers
                spent: dict[str, list[float]] = {n: [] for n in libs}
                for _ in range(args.rounds):
                    for n, lib in libs.items():
                        t0 = time.perf_counter()
                        for k_cache, v_cache in layers:
                            _run(lib, q, k_cache, v_cache, meta)
                        spent[n].append(time.perf_counter() - t0)
                o, t = (float(np.median(spent[n])) for n in ("other", "this"))
                print(f"| {name} | {mode} | {o * 1e3:.2f} | {t * 1e3:.2f} | {o / t:.2f}x |")


if __name__ == "__main__":
    main()
