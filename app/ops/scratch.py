"""One reused buffer for a thread's broadcast products, chunk after chunk.

A chunked broadcast backward (app/ops/linear.py) makes two (rows, in, out) products per chunk,
each summed at once and dropped: the article's first layer makes 154 of 2 MiB. Allocated
fresh each time, they fragment the thread's malloc arena: the small blocks torch allocates
between two products (each new tensor's own bookkeeping) land in the hole the last product
left, the next product no longer fits there, and the arena grows until several products'
worth of pages are touched (one thread: +10 MB for 2 MiB products; the article's run on a
fresh server: ~10 MB of its peak). A `Scratch` holds one buffer per thread instead, and every
broadcast a formula makes while it is `lent` is written into it with `out=`.

The buffer is handed out only while no product written on it earlier can be read (neither
the tensor handed out nor any view of its storage is alive), otherwise the product is
allocated as usual; and in the layout a fresh product would have. Same numbers either way,
bit for bit.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from app.ops.broadcast import BroadcastError, broadcast_shape

_LENT: contextvars.ContextVar[Scratch | None] = contextvars.ContextVar("scratch", default=None)

# the count of references to a tensor's storage, its own included (a private torch function;
# without it nothing is reused, which is only slower)
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


# a fresh product's (size, stride, dtype, numel) by its operands' shapes, strides and dtypes (False:
# not one dense block, never written on a buffer); shared by every thread's scratch
_LAYOUTS: dict[Any, tuple[torch.Size, tuple[int, ...], torch.dtype, int] | bool] = {}
MAX_LAYOUTS = 256


class Scratch:
    """One buffer, grown to the largest product asked for, for the thread that lends it."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None  # (capacity,)
        self._storage_object: Any = None  # the buffer's storage, and its address for torch
        self._storage = 0
        # the tensor on the buffer handed out for each kind of product (a linear layer's
        # chunks make two, x.g's and w.g's, in turn): the same one each time, no torch call
        self._views: dict[Any, torch.Tensor] = {}
        self._idle_uses = 0  # the storage's use count while no product holds it
        self._idle_references = 0  # a view's reference count (`_references`) while idle

    def multiply(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """`a * b`, written on the buffer where it can be: in the layout torch gives a fresh
        product (its shape, strides and dtype: contiguous for contiguous operands, else
        learnt from the first fresh one of these operands' shapes, strides and dtypes), and
        only while no product written earlier can still be read (`_out`)."""
        contiguous = a.is_contiguous() and b.is_contiguous()
        key = (a.shape, b.shape, a.dtype, b.dtype) if contiguous else (
            a.shape, b.shape, a.dtype, b.dtype, a.stride(), b.stride())  # fmt: skip
        layout = _LAYOUTS.get(key)
        if layout is None and contiguous:
            layout = _learn(key, _contiguous_layout(a, b))  # (what torch makes of these)
        out = self._out(key, layout) if layout else None
        if out is not None:
            return torch.mul(a, b, out=out)  # (returns `out` itself)
        made = torch.mul(a, b)  # (torch's own error where they cannot broadcast)
        if layout is None:  # strided operands: the layout of this fresh one, for the next
            _learn(key, (made.shape, made.stride(), made.dtype, made.numel()))
        return made

    def _out(self, key: Any, layout: tuple) -> torch.Tensor | None:
        """The buffer's tensor for `key`, or None while a product written earlier can still
        be read: a tensor handed out is alive while anything references it (its reference
        count over the idle one, measured by the same code when it was made), and any view
        of it holds the buffer's storage (its use count over the idle one)."""
        views = self._views
        if views and (
            _storage_use_count(self._storage) != self._idle_uses
            or _references(views) != self._idle_references
        ):
            return None  # never written over while anything can still read it
        out = views.get(key)
        if out is not None:
            return out
        size, stride, dtype, n = layout
        buffer = self._buffer
        if buffer is None or buffer.dtype != dtype or buffer.numel() < n:
            views.clear()
            self._buffer = self._storage_object = buffer = None  # (freed before the next)
            self._buffer = buffer = torch.empty(n, dtype=dtype)
            # its storage object kept: its use count is read without making one each time
            self._storage_object = buffer.untyped_storage()
            self._storage = self._storage_object._cdata
        views[key] = buffer.as_strided(size, stride)
        del buffer
        self._idle_uses = _storage_use_count(self._storage)  # the buffer, its views, storage
        self._idle_references = _references(views)
        return views[key]

    @contextlib.contextmanager
    def lent(self) -> Iterator[None]:
        """Broadcast products made in this block go to this buffer where they can."""
        token = _LENT.set(self)
        try:
            yield
        finally:
            _LENT.reset(token)


def _references(views: dict[Any, torch.Tensor]) -> int:
    """The most references any of `views` has (counted the same way whenever asked)."""
    return max(sys.getrefcount(view) for view in views.values())


def _learn(key: Any, layout: Any) -> Any:
    """Keep `layout` for `key`'s products: False when it is not one dense block (a product
    never written on a buffer), or when `key`'s operands cannot broadcast."""
    if len(_LAYOUTS) >= MAX_LAYOUTS:
        _LAYOUTS.clear()  # (a few kinds a layer: this only bounds a long-lived server)
    if layout is not False and not _dense(layout[0], layout[1]):
        layout = False
    _LAYOUTS[key] = layout
    return layout


def _contiguous_layout(a: torch.Tensor, b: torch.Tensor) -> Any:
    """The layout of `a * b` for contiguous operands: contiguous (torch's TensorIterator
    lays its output out as its inputs are), in torch's result dtype; False where they
    cannot broadcast."""
    try:
        size = broadcast_shape(a.shape, b.shape)  # (torch.broadcast_shapes imports sympy)
    except BroadcastError:
        return False
    stride = tuple(math.prod(size[d + 1 :]) for d in range(len(size)))
    return torch.Size(size), stride, torch.result_type(a, b), math.prod(size)  # (0-dim too)


def _dense(size: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether a layout covers exactly prod(size) elements, each once (a permutation of a
    contiguous one)."""
    expected = 1  # the stride a dense layout's next dim has, dims taken from the innermost
    for step, extent in sorted((st, sz) for sz, st in zip(size, stride) if sz != 1):
        if step != expected:
            return False
        expected *= extent
    return True


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


def multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a * b` (a broadcast), on the lent scratch's buffer where it can be."""
    scratch = _LENT.get()
    if scratch is None or _storage_use_count is None or a.is_meta or b.is_meta:
        return torch.mul(a, b)
    return scratch.multiply(a, b)
