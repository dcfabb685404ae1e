"""Measure the peak extra memory of a block of torch code on the CPU, allocation by allocation.

CPUs keep no allocator statistics the way CUDA does, and process RSS is blurred by the
allocator's caching, so this counts tensor storages directly: a TorchDispatchMode sees every
op's outputs, adds each new storage's bytes to a live total, and drops them again once the
storage is freed (checked through weak references at every op). Views and in-place ops add
nothing, as they allocate nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakMemory(TorchDispatchMode):
    """`with PeakMemory() as m: ...` then `m.peak_bytes`: the most bytes alive at once among
    the tensors allocated inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}  # storage key -> (ref, bytes)
        self.live_bytes = 0
        self.peak_bytes = 0

    def _collect_freed(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.live_bytes -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        self._collect_freed()
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {  # a view or in-place result shares its input's storage: nothing new
            t.untyped_storage()._cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live and key not in inputs:
                    ref = StorageWeakRef(storage)
                    nbytes = storage.nbytes()
                    self.live[key] = (ref, nbytes)
                    self.live_bytes += nbytes
                    self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out
