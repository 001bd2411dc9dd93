"""The repository's top-level folders on `sys.path` (pytest and the perf scripts put
the root there; so does `python -m` run from it) must not break other packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_transformers_models_import_with_the_repository_root_on_the_path() -> None:
    # `kernels/` is also the name of Hugging Face's package, which transformers
    # imports with its models once installed (a dependency from 5.25 on).
    code = (
        "import kernels, tgi_mp.kernels.cpu_build\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "print(kernels.__file__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = Path(done.stdout.strip().splitlines()[-1]).resolve()
    ours = (ROOT / "kernels" / "__init__.py").resolve()
    assert loaded != ours or not _hub_installed()  # Hugging Face's, wherever it exists


def _hub_installed() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("kernels")
    except PackageNotFoundError:
        return False
    return True
