"""Device-to-host copies that the model does not wait for.

On a GPU, a batch's arrays are copied into pinned host memory with ``non_blocking=True`` and a
CUDA event is recorded; the store's writer threads wait for that event when they read a sample
(``numpy.asarray`` on a `HostSlice`), so the next batch's forward pass starts while the copy,
compression, checksums and fsync of this one go on. On the CPU the tensor is used in place.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class HostBatch:
    """A (device) tensor on its way to host memory; ``slice`` gives per-sample views."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.event = None
        if tensor.device.type == "cuda":
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tensor

    def ready(self) -> torch.Tensor:
        """The host tensor, once the copy has finished."""
        if self.event is not None:
            self.event.synchronize()
        return self.host

    def slice(self, *index: Any) -> HostSlice:
        """A view of ``host[index]`` that is read only when needed."""
        return HostSlice(self, index)


class HostSlice:
    """``numpy.asarray(x)`` waits for the copy and returns ``host[index]`` as a numpy array."""

    def __init__(self, batch: HostBatch, index: tuple[Any, ...]) -> None:
        self.batch, self.index = batch, index

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.batch.ready()[self.index].numpy()
        return out if dtype is None else out.astype(dtype)
