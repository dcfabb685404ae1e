"""Joining and splitting: Python lists of tensors (`hs = []`, `hs.append(h)`), `torch.cat`,
`torch.stack`, `split`, `chunk`. A list is the learner's own value, as in Python: appending to
it keeps every tensor appended alive (the dry run counts those bytes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from app.ops.making import MakeError
from app.ops.traced import Traced, made

MAX_LIST = 10_000  # entries of one list (a statement appends one: the statement limit agrees)


class TensorList(list):
    """A list of tensors the program made (`[a, b]`, or `[]` grown with `.append`).
    `frozen`: the forward's list, read by the backward (which never changes it)."""

    name: str = ""
    frozen: bool = False

    def describe(self) -> str:
        if self.name:
            return self.name
        if len(self) <= 4:
            return "[" + ", ".join(t.expr for t in self) + "]"
        return f"[{len(self)} tensors]"


def append(items: TensorList, value: Any) -> Traced:
    """`hs.append(h)`: the tensor itself, not a copy (a later in-place write shows in both)."""
    if items.frozen:
        raise MakeError(f"{items.name or 'this list'} is the forward's: the backward reads it, "
                        "never appends to it (make a list of its own: `dhs = []`)")  # fmt: skip
    if not isinstance(value, Traced):
        raise MakeError(".append takes a tensor (lists here hold tensors)")
    if len(items) >= MAX_LIST:
        raise MakeError(f"a list holds at most {MAX_LIST:,} tensors", "budget")
    items.append(value)
    # a step that makes nothing but keeps the tensor alive as long as the list
    keep = {"keeps": value.t.numel() * value.t.element_size(), "view": True}
    return made(value.t, f"{items.describe()}.append({value.expr})", "reshape", "append",
                [value], keep)  # fmt: skip


def _tensors(items: Any, what: str) -> list[Traced]:
    if not isinstance(items, (list, tuple)) or not items:
        raise MakeError(f"{what} takes a non-empty list (or tuple) of tensors")
    if not all(isinstance(t, Traced) for t in items):
        raise MakeError(f"{what} takes tensors only")
    return list(items)


def _shown(items: Any) -> str:
    if isinstance(items, TensorList):
        return items.describe()
    parts = [t.expr for t in items]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")" if len(parts) <= 4 else (
        f"({len(parts)} tensors)")  # fmt: skip


def cat(items: Any, dim: int = 0) -> Traced:
    """`torch.cat(tensors, dim)`: joined along an existing dim."""
    tensors = _tensors(items, "torch.cat")
    t = torch.cat([x.t for x in tensors], dim)
    return made(t, f"torch.cat({_shown(items)}, {dim})", "copy", "cat", _few(tensors))


def stack(items: Any, dim: int = 0) -> Traced:
    """`torch.stack(tensors, dim)`: joined along a new dim (all of one shape)."""
    tensors = _tensors(items, "torch.stack")
    shapes = {x.shape for x in tensors}
    if len(shapes) > 1:
        raise MakeError(
            f"torch.stack needs tensors of one shape; got {sorted(shapes)[:3]}", "shape"
        )
    t = torch.stack([x.t for x in tensors], dim)
    return made(t, f"torch.stack({_shown(items)}, {dim})", "copy", "stack", _few(tensors))


def _few(tensors: Sequence[Traced]) -> list[Traced]:
    """The operands a step lists: every one's history, but at most 16 shapes shown."""
    return list(tensors) if len(tensors) <= 16 else list(tensors[:16])


def split(x: Traced, size: Any, dim: int = 0) -> tuple[Traced, ...]:
    """`x.split(size, dim)` (or a list of sizes): views, as torch gives them."""
    if isinstance(size, (list, tuple)):
        if not all(isinstance(s, int) and s >= 0 for s in size):
            raise MakeError(".split takes a whole size, or a list of sizes")
    elif not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise MakeError(".split(size, dim): size is a whole number >= 1")
    parts = x.t.split(list(size) if isinstance(size, (list, tuple)) else size, dim)
    return _pieces(x, parts, f"split({size!r}, {dim})", "split")


def chunk(x: Traced, chunks: int, dim: int = 0) -> tuple[Traced, ...]:
    """`x.chunk(n, dim)`: n views (the last may be smaller)."""
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise MakeError(".chunk(n, dim): n is a whole number >= 1")
    if chunks > MAX_LIST:
        raise MakeError(f".chunk into at most {MAX_LIST:,} pieces", "budget")
    return _pieces(x, x.t.chunk(chunks, dim), f"chunk({chunks}, {dim})", "chunk")


def _pieces(x: Traced, parts: Sequence[torch.Tensor], call: str, op: str) -> tuple[Traced, ...]:
    if len(parts) > MAX_LIST:
        raise MakeError(f"{op} into {len(parts):,} pieces; at most {MAX_LIST:,}", "budget")
    base = f"{x._wrapped(4)}.{call}"
    return tuple(made(p, f"{base}[{i}]", "index", "getitem", [x]) for i, p in enumerate(parts))
