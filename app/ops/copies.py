"""What a torch call copies that its output does not show: the temporary bytes the dry run
adds to a step, and an einsum's work."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def is_stretched(t: torch.Tensor, dims: int | None = None) -> bool:
    """A dim of more than one entry with stride 0 (an `expand`), among the last `dims`."""
    pairs = list(zip(t.shape, t.stride()))[-dims if dims else 0 :]
    return any(stride == 0 and size > 1 for size, stride in pairs)


def blas_copy_bytes(t: torch.Tensor) -> int:
    """Bytes of the contiguous copy that mm / mv / bmm make of an operand BLAS cannot read in
    place: a matrix (its last two dims) that is stretched (stride 0) or neither row- nor
    column-major with a leading dimension, a stretched vector. Measured on CPU: `e @ v` with
    `e = s.expand(24000, 24000)` copies e whole (2.3 GB), though e itself takes 4 bytes."""
    if t.ndim == 0:
        return 0
    if t.ndim == 1:
        return t.numel() * t.element_size() if is_stretched(t) else 0
    (rows, cols), (row_stride, col_stride) = t.shape[-2:], t.stride()[-2:]
    row_major = (col_stride == 1 or cols == 1) and row_stride >= max(1, cols)
    col_major = (row_stride == 1 or rows == 1) and col_stride >= max(1, rows)
    if not is_stretched(t, 2) and (row_major or col_major):
        return 0
    return math.prod(t.shape) * t.element_size()  # batch dims included: each matrix copied


def einsum_work(equation: str, shapes: Sequence[Sequence[int]]) -> int:
    """Multiply-adds of an einsum: the product of every index's size (`...` dims included)."""
    terms = equation.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    ellipses = []  # the `...` dims of each operand that has them: they broadcast together
    for term, shape in zip(terms, shapes):
        letters = term.replace("...", "")
        lead = len(shape) - len(letters)
        if "..." in term:
            ellipses.append(tuple(shape[:lead]))
        for letter, size in zip(letters, shape[lead:]):
            sizes[letter] = max(sizes.get(letter, 1), size)
    ellipsis = math.prod(torch.broadcast_shapes(*ellipses)) if ellipses else 1
    return math.prod(sizes.values()) * ellipsis
