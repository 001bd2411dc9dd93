"""Without a GPU, Triton kernels run in Triton's interpreter (numpy on the CPU).

Set before anything imports triton: `triton.jit` reads it when a kernel is defined.
Child processes (servers started by tests) inherit it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
