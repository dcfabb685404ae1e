"""The free functions a formula calls on `Traced` operands (`torch.einsum`, `torch.where`,
`F.cross_entropy`, ...), and `unbroadcast`, the adjoint of broadcasting that every op's
backward reduces a gradient through, so the rule lives in exactly one place."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from app.ops.broadcast import broadcast_rule, operand_rule
from app.ops.copies import einsum_work, is_stretched
from app.ops.traced import ATOM, Traced, _fmt_scalar


def unbroadcast(grad: Traced, shape: Sequence[int]) -> Traced:
    """The adjoint of broadcasting: sum a gradient over the dims its operand was stretched on.

    Leading dims the operand lacks are summed away; dims where it was 1 are summed with
    keepdim, so the result has exactly `shape`. Each sum is one traced `reduce` step.
    """
    shape = tuple(shape)
    rule = operand_rule(shape, grad.shape)
    missing = grad.ndim - len(shape)
    leading = [d for d in rule.grad_sum_dims if d < missing]
    stretched = [d - missing for d in rule.grad_sum_dims if d >= missing]
    if leading:
        grad = grad.sum(leading[0] if len(leading) == 1 else tuple(leading))
    if stretched:
        grad = grad.sum(stretched[0] if len(stretched) == 1 else tuple(stretched), keepdim=True)
    return grad


def arange(end: int, like: torch.Tensor) -> Traced:
    """`torch.arange(n)` / `range(n)` used as an index: the int64 tensor 0..n-1, on the
    device of the tensors it indexes (meta in the dry run)."""
    t = torch.arange(end, device=like.device)
    return Traced(t, f"torch.arange({end})")


def cross_entropy(logits: Traced, target: Traced, reduction: str = "mean") -> Traced:
    """`F.cross_entropy(logits, target)`: the mean of -log_softmax(logits)[target]."""
    t = torch.nn.functional.cross_entropy(logits.t, target.t, reduction=reduction)
    extra = "" if reduction == "mean" else f", reduction={reduction!r}"
    expr = f"F.cross_entropy({logits.expr}, {target.expr}{extra})"
    return logits._make(t, expr, ATOM, "reduce", "cross_entropy", [logits, target])


def einsum(equation: str, *operands: Traced) -> Traced:
    """`torch.einsum(equation, ...)`: every index's product, summed over the ones not kept."""
    t = torch.einsum(equation, *(o.t for o in operands))
    args = ", ".join([repr(equation), *(o.expr for o in operands)])
    first = operands[0]
    detail = {}
    if t.is_meta:
        detail["index_product"] = einsum_work(equation, [o.shape for o in operands])
        if len(operands) > 2:  # torch may build the outer product of the operands first
            detail["temp_bytes"] = detail["index_product"] * t.element_size()
        else:  # a stretched operand is copied whole before its bmm (measured on CPU)
            copies = sum(o.t.numel() * o.t.element_size() for o in operands if is_stretched(o.t))
            if copies:
                detail["temp_bytes"] = copies
    return first._make(t, f"torch.einsum({args})", ATOM, "einsum", "einsum", operands, detail)


def filled_like(other: Traced, value: float) -> Traced:
    """`torch.ones_like` / `torch.zeros_like`."""
    name = {0.0: "zeros_like", 1.0: "ones_like"}[float(value)]
    t = torch.full_like(other.t, value)
    return other._make(t, f"torch.{name}({other.expr})", ATOM, "fill", name, [other])


def one_hot(index: Traced, num_classes: int) -> Traced:
    """`F.one_hot(index, C)`: (*B,) class indices -> (*B, C) int64 rows of 0s with one 1."""
    t = torch.nn.functional.one_hot(index.t, num_classes)
    expr = f"F.one_hot({index.expr}, {num_classes})"
    return index._make(t, expr, ATOM, "index", "one_hot", [index])


def where(cond: Traced, a: Traced | float, b: Traced | float) -> Traced:
    """`torch.where(cond, a, b)`: pick from `a` where `cond` holds, else from `b`."""
    values = [v.t if isinstance(v, Traced) else v for v in (a, b)]
    t = torch.where(cond.t, *values)
    exprs = [v.expr if isinstance(v, Traced) else _fmt_scalar(v) for v in (a, b)]
    expr = f"torch.where({cond.expr}, {exprs[0]}, {exprs[1]})"
    operands = [cond, *(v for v in (a, b) if isinstance(v, Traced))]
    detail = {}
    shapes = [o.shape for o in operands]
    if len(set(shapes)) > 1 and t.is_meta:
        rule = broadcast_rule(shapes[1], shapes[-1]) if len(shapes) == 3 else None
        if rule is not None:
            detail["broadcast"] = rule.as_dict()
    return cond._make(t, expr, ATOM, "mask", "where", operands, detail)
