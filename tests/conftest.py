"""Set-up every test module shares, before any of them imports anything else.

* Without a GPU, Triton kernels run in Triton's interpreter (numpy on the CPU): set
  before anything imports triton (`triton.jit` reads it when a kernel is defined);
  child processes (servers started by tests) inherit it.
* Hugging Face's `kernels` package is imported first, from site-packages. pytest
  puts the repository root on `sys.path` (the tests import `tests.*`), where our
  own `kernels/` directory (installed as `tgi_mp.kernels`) would otherwise shadow
  it, and transformers >= 5.25 imports `kernels` whenever it is installed (it is
  one of its dependencies): every transformers model import failed.
"""

import importlib
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _import_hub_kernels() -> None:
    root = Path(__file__).resolve().parents[1]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != root]
    try:
        if "kernels" not in sys.modules:
            importlib.import_module("kernels")
    except ImportError:  # not installed: transformers does not look for it either
        pass
    finally:
        sys.path[:] = saved


_import_hub_kernels()
