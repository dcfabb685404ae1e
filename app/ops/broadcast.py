"""Broadcasting as a rule: the result shape of `a op b`, and for each operand the dims it was
stretched on (the dims its gradient sums over; `functional.unbroadcast` does that sum)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Shape = tuple[int, ...]


class BroadcastError(ValueError):
    """Two shapes that cannot broadcast; the message names the dim and both sizes."""

    def __init__(self, dim: int, a: int, b: int):
        self.dim, self.a, self.b = dim, a, b
        super().__init__(f"dim {dim}: a has {a}, b has {b}; sizes must be equal or one of them 1")


@dataclass(frozen=True)
class OperandRule:
    aligned: Shape  # right-aligned to the result's rank, padded with 1s on the left
    expanded: list[int]  # dims of the result where this operand is stretched
    grad_sum_dims: list[int]  # dims to sum a result-shaped gradient over to get this shape

    def as_dict(self) -> dict[str, list[int]]:
        return {
            "aligned": list(self.aligned),
            "expanded": self.expanded,
            "grad_sum_dims": self.grad_sum_dims,
        }


@dataclass(frozen=True)
class BroadcastRule:
    result: Shape
    a: OperandRule
    b: OperandRule

    def as_dict(self) -> dict[str, Any]:
        return {"result": list(self.result), "a": self.a.as_dict(), "b": self.b.as_dict()}


def operand_rule(shape: Shape, result: Shape) -> OperandRule:
    missing = len(result) - len(shape)
    aligned = (1,) * missing + tuple(shape)
    expanded = [d for d, (s, r) in enumerate(zip(aligned, result)) if s == 1 and r > 1]
    grad_sum = [d for d in range(len(result)) if d < missing or d in expanded]
    return OperandRule(aligned, expanded, grad_sum)


def broadcast_shape(a: Sequence[int], b: Sequence[int]) -> Shape:
    """The result shape of `a op b` (BroadcastError where they cannot broadcast)."""
    a, b = tuple(a), tuple(b)
    if a == b:  # (the common case, and it always broadcasts)
        return a
    ndim = max(len(a), len(b))
    a_aligned = (1,) * (ndim - len(a)) + a
    b_aligned = (1,) * (ndim - len(b)) + b
    result = []
    for d, (sa, sb) in enumerate(zip(a_aligned, b_aligned)):
        if sa != sb and sa != 1 and sb != 1:
            raise BroadcastError(d - ndim, sa, sb)
        result.append(sb if sa == 1 else sa)
    return tuple(result)


def broadcast_rule(a: Sequence[int], b: Sequence[int]) -> BroadcastRule:
    """The result shape of `a op b`, and for each operand how it was stretched to get there."""
    a, b = tuple(a), tuple(b)
    result_shape = broadcast_shape(a, b)
    return BroadcastRule(result_shape, operand_rule(a, result_shape), operand_rule(b, result_shape))
