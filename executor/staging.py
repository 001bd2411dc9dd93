"""Host <-> device transfers of a step: one copy in, one wait out.

On CUDA a step's integer inputs (token ids, positions, slots, block tables, ...) are
packed into one pinned host buffer and sent with a single non-blocking copy (and its
float sampling columns in another); sampled
ids and logprobs come back through pinned buffers with one synchronisation. On the
CPU the same calls are plain views, no copies.
"""

from __future__ import annotations

import numpy as np
import torch


class HostStaging:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        # One pinned buffer per dtype (int64 ids and offsets, float32 sampling columns).
        self._up: dict[torch.dtype, torch.Tensor] = {}
        self._up_done: dict[torch.dtype, torch.cuda.Event] = {}

    def upload(
        self, arrays: list[np.ndarray], dtype: torch.dtype = torch.int64
    ) -> list[torch.Tensor]:
        """Device tensors of `dtype` with the values (and shapes) of `arrays`, in one copy."""
        sizes = [a.size for a in arrays]
        total = sum(sizes)
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        if not self.cuda:
            flat = torch.from_numpy(
                np.concatenate([np.asarray(a, np_dtype).ravel() for a in arrays])
            )
            return _split(flat.to(self.device), arrays, sizes)
        if (done := self._up_done.get(dtype)) is not None:  # the last copy may still read it
            done.synchronize()
        buf = self._up.get(dtype, torch.empty(0, dtype=dtype))
        if buf.numel() < total:
            buf = self._up[dtype] = torch.empty(
                max(total, 2 * buf.numel()), dtype=dtype
            ).pin_memory()
        host = buf[:total].numpy()
        at = 0
        for a, n in zip(arrays, sizes, strict=True):
            host[at : at + n] = a.ravel()
            at += n
        flat = buf[:total].to(self.device, non_blocking=True)
        self._up_done[dtype] = torch.cuda.Event()
        self._up_done[dtype].record()
        return _split(flat, arrays, sizes)

    def download(self, tensors: list[torch.Tensor]) -> list[np.ndarray]:
        """Host copies of `tensors`, waiting once for all of them."""
        if not self.cuda:
            return [t.numpy() for t in tensors]
        hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for h, t in zip(hosts, tensors, strict=True):
            h.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        return [h.numpy() for h in hosts]


def _split(flat: torch.Tensor, arrays: list[np.ndarray], sizes: list[int]) -> list[torch.Tensor]:
    parts = flat.split(sizes)
    return [p.view(a.shape) for p, a in zip(parts, arrays, strict=True)]
