"""Tensors a program makes: `torch.zeros/ones/full/empty/eye/arange`, the seeded draws
`torch.rand/randn` and `F.dropout`'s mask, and `tril`/`triu`.

A `Maker` says where they are made: on meta tensors in the dry run (shapes and bytes only),
on the CPU in the real run, in the run's dtype (as if it were torch's default dtype), and
drawn from the run's own seeded generator. Sizes are bounded before torch sees them, so a
request for 10**20 entries is a budget refusal, never an overflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from app.ops.traced import Traced, _fmt_scalar, made

MAX_ENTRIES = 1 << 40  # any one made tensor; the memory budget then decides on its bytes


class MakeError(ValueError):
    """An argument an op refuses before torch sees it: `kind` is the evaluator's (not_allowed,
    budget), so the learner gets a 422 at the line, never torch's own words."""

    def __init__(self, message: str, kind: str = "not_allowed"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Maker:
    """Where a program's own tensors are made: device (meta in the dry run), the run's float
    dtype, its generator (None on meta), and the dtype draws are made in (the float64 recheck
    of a float32 run draws the run's float32 numbers, then widens them)."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    generator: torch.Generator | None = None
    draw_dtype: torch.dtype | None = None

    @property
    def meta(self) -> bool:
        return self.device == "meta"

    def float_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        return self.dtype if dtype is None or dtype.is_floating_point else dtype


def sizes_of(args: Sequence[Any], what: str) -> tuple[int, ...]:
    """`zeros(2, 3)` and `zeros((2, 3))` / `zeros(x.shape)` alike: whole numbers >= 0."""
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = tuple(args[0])
    if not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
        raise MakeError(f"{what} takes sizes as whole numbers (or one tuple of them)")
    if any(a < 0 for a in args):
        raise MakeError(f"{what}: a size cannot be negative, got {tuple(args)}")
    if len(args) > 8:
        raise MakeError(f"{what}: at most 8 dims")
    _bounded(math.prod(args), what)
    return tuple(args)


def _bounded(entries: int, what: str) -> None:
    if entries > MAX_ENTRIES:
        raise MakeError(f"{what} of {entries:.3g} entries: far over the memory budget", "budget")


def _args(sizes: tuple[int, ...]) -> str:
    return ", ".join(map(str, sizes))


def _dtype_arg(dtype: torch.dtype | None) -> str:
    return "" if dtype is None else f", dtype=torch.{str(dtype).removeprefix('torch.')}"


def filled(maker: Maker, name: str, sizes: tuple[int, ...], value: float,
           dtype: torch.dtype | None = None) -> Traced:  # fmt: skip
    """`torch.zeros / ones / empty` (empty is zero-filled here: nothing unset is ever read)."""
    t = torch.full(sizes, value, dtype=maker.float_dtype(dtype), device=maker.device)
    return made(t, f"torch.{name}({_args(sizes)}{_dtype_arg(dtype)})", "fill", name)


def full(
    maker: Maker, sizes: tuple[int, ...], value: Any, dtype: torch.dtype | None = None
) -> Traced:
    """`torch.full(size, value)`: torch's dtype rule (a bool fill is bool, an int fill int64,
    a float fill the run's dtype), unless dtype= says."""
    if dtype is None:
        dtype = (
            torch.bool
            if isinstance(value, bool)
            else torch.int64
            if isinstance(value, int)
            else None
        )
    t = torch.full(sizes, value, dtype=maker.float_dtype(dtype), device=maker.device)
    expr = f"torch.full(({_args(sizes)}{',' if len(sizes) == 1 else ''}), {_fmt_scalar(value)})"
    return made(t, expr, "fill", "full")


def eye(maker: Maker, n: int, m: int | None = None, dtype: torch.dtype | None = None) -> Traced:
    sizes = sizes_of((n,) if m is None else (n, m), "torch.eye")
    t = torch.eye(*sizes, dtype=maker.float_dtype(dtype), device=maker.device)
    return made(t, f"torch.eye({_args(sizes)})", "fill", "eye")


def arange(maker: Maker, start: Any, end: Any = None, step: Any = None,
           dtype: torch.dtype | None = None) -> Traced:  # fmt: skip
    """`torch.arange(end)`, `(start, end)`, `(start, end, step)`: int64 from whole numbers,
    the run's float dtype when any bound is a float."""
    bounds = [start] if end is None else [start, end] if step is None else [start, end, step]
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds):
        raise MakeError("torch.arange takes numbers: end, or start, end[, step]")
    if not all(math.isfinite(b) for b in bounds):
        raise MakeError("torch.arange takes finite bounds")
    lo, hi, by = (0, bounds[0], 1) if len(bounds) == 1 else (*bounds, 1)[:3]
    if by == 0:
        raise MakeError("torch.arange's step cannot be 0")
    if len(bounds) == 1 and hi < 0:
        raise MakeError(f"torch.arange(n) needs n >= 0, not {hi}")
    if (hi - lo) * by < 0:
        raise MakeError(f"torch.arange({', '.join(map(str, bounds))}): the step goes away from "
                        "the end (torch refuses it)")  # fmt: skip
    _bounded(math.ceil((hi - lo) / by), "torch.arange")
    if dtype is None and any(isinstance(b, float) for b in bounds):
        dtype = maker.dtype
    t = torch.arange(lo, hi, by, dtype=maker.float_dtype(dtype) if dtype else None,
                     device=maker.device)  # fmt: skip
    return made(t, f"torch.arange({', '.join(map(str, bounds))})", "fill", "arange")


def drawn(maker: Maker, name: str, sizes: tuple[int, ...]) -> Traced:
    """`torch.rand / randn`: from the run's generator, in the run's dtype."""
    if maker.meta:
        t = torch.empty(sizes, dtype=maker.dtype, device="meta")
    else:
        fn = torch.rand if name == "rand" else torch.randn
        t = fn(sizes, generator=maker.generator, dtype=maker.draw_dtype or maker.dtype)
        t = t.to(maker.dtype)
    return made(t, f"torch.{name}({_args(sizes)})", "fill", name)


def dropout(maker: Maker, x: Traced, p: float, training: bool = True) -> Traced:
    """`F.dropout(x, p)`: x * mask / (1 - p), the mask kept with probability 1 - p, drawn as
    PyTorch's CPU kernel draws it (bernoulli_ on a tensor like x), from the run's generator.
    `training=False` (or p = 0) is x itself, as in PyTorch."""
    if not training or p == 0 or x.t.numel() == 0:
        return x
    if maker.meta:
        noise = torch.empty(x.shape, dtype=x.t.dtype, device="meta")
    elif p == 1:
        noise = torch.zeros_like(x.t)
    else:
        noise = torch.empty_like(x.t).bernoulli_(1 - p, generator=maker.generator)
        noise.div_(1 - p)
    detail = {"temp_bytes": x.t.numel() * x.t.element_size()}  # the mask
    return made(x.t * noise, f"F.dropout({x.expr}, {_fmt_scalar(p)})", "elementwise",
                "dropout", [x], detail)  # fmt: skip


def triangle(x: Traced, upper: bool, diagonal: int = 0) -> Traced:
    """`torch.tril / triu(x, diagonal=)`: the lower (upper) triangle of the last two dims."""
    if x.ndim < 2:
        raise MakeError(f"torch.{'triu' if upper else 'tril'} needs at least 2 dims, got {x.ndim}")
    name = "triu" if upper else "tril"
    if x.t.is_meta:  # the same shape (torch's meta tril loads its Python refs: 2 s, once)
        t = torch.empty(x.shape, dtype=x.t.dtype, device="meta")
    else:
        t = torch.triu(x.t, diagonal) if upper else torch.tril(x.t, diagonal)
    extra = f", diagonal={diagonal}" if diagonal else ""
    return made(t, f"torch.{name}({x.expr}{extra})", "mask", name, [x])
