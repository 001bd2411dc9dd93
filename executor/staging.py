"""Host <-> device transfers of a step: one copy in, one wait out.

On CUDA a step's integer inputs (token ids, positions, slots, block tables, ...) are
packed into one pinned host buffer and sent with a single non-blocking copy; sampled
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
        self._up = torch.empty(0, dtype=torch.int64)
        self._up_done: torch.cuda.Event | None = None

    def upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """int64 device tensors with the values (and shapes) of `arrays`."""
        sizes = [a.size for a in arrays]
        total = sum(sizes)
        if not self.cuda:
            flat = torch.from_numpy(
                np.concatenate([np.asarray(a, np.int64).ravel() for a in arrays])
            )
            return _split(flat.to(self.device), arrays, sizes)
        if self._up_done is not None:  # the last step's copy may still read the buffer
            self._up_done.synchronize()
        if self._up.numel() < total:
            self._up = torch.empty(max(total, 2 * self._up.numel()), dtype=torch.int64).pin_memory()
        host = self._up[:total].numpy()
        at = 0
        for a, n in zip(arrays, sizes, strict=True):
            host[at : at + n] = a.ravel()
            at += n
        flat = self._up[:total].to(self.device, non_blocking=True)
        self._up_done = torch.cuda.Event()
        self._up_done.record()
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
