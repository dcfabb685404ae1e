"""One reused buffer for a thread's broadcast products, chunk after chunk.

A chunked broadcast backward (app/ops/linear.py) makes two (rows, in, out) products per chunk,
each summed at once and dropped: the article's first layer makes 154 of 2 MiB. Allocated
fresh each time, they fragment the thread's malloc arena: the small blocks torch allocates
between two products (each new tensor's own bookkeeping) land in the hole the last product
left, the next product no longer fits there, and the arena grows until several products'
worth of pages are touched (one thread: +10 MB for 2 MiB products; the article's run on a
fresh server: ~10 MB of its peak). A `Scratch` holds one buffer per thread instead, and every
broadcast a formula makes while it is `lent` is written into it with `out=`.

The buffer is handed out only while nothing else uses its storage (no view of an earlier
product is alive): otherwise the product is allocated as usual. Same numbers either way.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch

from app.ops.broadcast import BroadcastError, broadcast_shape

_LENT: contextvars.ContextVar[Scratch | None] = contextvars.ContextVar("scratch", default=None)

# the count of references to a tensor's storage, its own included (a private torch function;
# without it nothing is reused, which is only slower)
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _uses(t: torch.Tensor) -> int:
    return _storage_use_count(t.untyped_storage()._cdata)  # (+1: the storage object asked)


class Scratch:
    """One buffer, grown to the largest product asked for, for the thread that lends it."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None  # (capacity,)
        # each product's place on the buffer, by its operands' shapes and dtypes: a linear
        # layer's chunks make two kinds (x.g's and w.g's), in turn
        self._views: dict[Any, torch.Tensor] = {}
        self._idle_uses = 0  # the storage's use count while no product holds it

    def out(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
        """Where `a * b` may be written: a tensor of its shape and dtype on the buffer, or
        None while an earlier product on it is alive (or the two cannot broadcast).

        A product handed out is one of `_views` itself, so it is alive while a reference to
        it is (Python's count when idle: the dict's, `view` here and getrefcount's argument)
        or a view of the storage is (the storage's count when idle: the buffer, `_views`)."""
        for view in self._views.values():
            if sys.getrefcount(view) > 3:
                return None  # never written over while anything can still read it
        if self._buffer is not None and _uses(self._buffer) != self._idle_uses:
            return None
        key = (a.shape, b.shape, a.dtype, b.dtype)
        view = self._views.get(key)
        if view is not None:  # (every chunk but the last)
            return view
        try:
            shape = broadcast_shape(a.shape, b.shape)  # (broadcast_shapes imports sympy)
        except BroadcastError:
            return None  # torch's own error follows
        dtype, n = torch.result_type(a, b), math.prod(shape)  # (0-dim operands too)
        buffer = self._buffer
        if buffer is None or buffer.dtype != dtype or buffer.numel() < n:
            self._views.clear()
            self._buffer = buffer = None  # (freed before the next is made)
            self._buffer = buffer = torch.empty(n, dtype=dtype)
        view = self._views[key] = buffer[:n].view(shape)
        self._idle_uses = _uses(buffer)
        return view

    @contextlib.contextmanager
    def lent(self) -> Iterator[None]:
        """Broadcast products made in this block go to this buffer where they can."""
        token = _LENT.set(self)
        try:
            yield
        finally:
            _LENT.reset(token)


class PerThread:
    """A `Scratch` for each thread that asks (a run's and its spare's), dropped together."""

    def __init__(self) -> None:
        self._scratches: dict[int, Scratch] = {}

    def lent(self) -> contextlib.AbstractContextManager[None]:
        key = threading.get_ident()
        scratch = self._scratches.get(key)
        if scratch is None:  # (each thread only ever adds its own key)
            scratch = self._scratches[key] = Scratch()
        return scratch.lent()


def product_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Where the broadcast product `a * b` may be written: the lent scratch's buffer, or None
    (no scratch lent, meta tensors, or the buffer in use)."""
    scratch = _LENT.get()
    if scratch is None or _storage_use_count is None or a.is_meta or b.is_meta:
        return None
    return scratch.out(a, b)
