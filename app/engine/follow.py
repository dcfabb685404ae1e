"""One element of a gradient, followed back to the terms its formula's reduction sums.

`x.g = (l1.g.unsqueeze(1) * w1).sum(-1)` makes each `x.g[i, j]` the sum of 50 products
`l1.g[i, k] * w1[j, k]`. The op that computes a gradient knows which slice of its broadcast
product that is (`Op.follow`, beside its backward); this module asks the op and cuts the
terms for the response. Only the slice is computed, so a follow costs about what its terms
cost, whatever the batch. The request is checked against the network's shapes before the run
(app/cost/admission.py `refuse_follow`, from `followable` and `view_shape`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from app.engine.network import Network
from app.ops import Op


def followable(net: Network, backward: Sequence[dict[str, Any]]) -> dict[str, tuple[int, ...]]:
    """`"x.g"` -> its shape, for every gradient an op of `net` can follow, in trace order."""
    names = {op.inputs[i] for op in net.ops for i in op.followed}
    return {
        f"{e['grad']}.g": tuple(e["shape"])
        for e in backward
        if e["grad"] in names and not e.get("variant")
    }


def view_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, cols) of a gradient's heatmap view (app.views.heatmap.as_2d)."""
    if len(shape) == 0:
        return (1, 1)
    return (1, shape[0]) if len(shape) == 1 else (math.prod(shape[:-1]), shape[-1])


def block_extreme(grad: torch.Tensor, block) -> tuple[int, ...]:
    """The index (into `grad`'s own shape) of the entry of largest magnitude in `block` of
    its heatmap view: the entry a downsampled heatmap's cell shows."""
    (r0, r1), (c0, c1) = block.rows, block.cols
    part = grad.reshape(view_shape(grad.shape))[
        r0:r1, c0:c1
    ].abs()  # (rows, cols) of the block: a view
    at = int(torch.nan_to_num(part, nan=math.inf).argmax())  # a NaN is never hidden
    row, col = r0 + at // part.shape[1], c0 + at % part.shape[1]
    if grad.ndim == 1:
        return (col,)
    lead = torch.unravel_index(torch.tensor(row), grad.shape[:-1])
    return (*(int(i) for i in lead), col)


def op_for(net: Network, name: str) -> Op:
    """The op whose backward computes `name`'s gradient and can follow it."""
    return next(op for op in net.ops if name in (op.inputs[i] for i in op.followed))


def follow(
    request,
    net: Network,
    env: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    user: bool = False,
    *,
    max_terms: int,
) -> dict[str, Any]:
    """The response's `follow`: the element's value in the gradient the run computed, and the
    terms of its formula from the gradients the run used (the learner's, where given), the
    first `max_terms` of them. `user`: the learner's formula computed this gradient."""
    name = request.grad.removesuffix(".g")
    if request.index is None:
        index = block_extreme(grads[name], request.block)
    else:
        index = tuple(request.index)
    op = op_for(net, name)
    trail = op.follow(name, index, grads[op.output], [env[n] for n in op.inputs])
    products = trail.products()  # (terms,): only this element's slice
    total = products.numel()
    shown = min(total, max_terms)
    factors = {n: f[:shown].tolist() for n, f in trail.factors.items()}
    values = products[:shown].tolist()
    terms = [
        {
            "index": position,
            "factors": {n: column[t] for n, column in factors.items()},
            "product": values[t],
        }
        for t, position in enumerate(trail.term_indices(shown))
    ]
    return {
        "grad": request.grad,
        "index": list(index),
        "value": grads[name][index].item(),
        "formula": trail.formula,
        "terms": terms,
        "sum": _finite(products.sum(dtype=torch.float64).item()),
        "terms_total": total,
        "abs_sum": _finite(products.abs().sum(dtype=torch.float64).item()),
        "product_shape": list(trail.product_shape),
        "slice": list(trail.slice),
        "factor_index": {n: list(i) for n, i in trail.at.items()},
        "source": "user" if user else "reference",
        **(_yours(grads[name][index].item(), products, trail.formula) if user else {}),
    }


def _yours(value: float, products: torch.Tensor, formula: str) -> dict[str, Any]:
    """With the learner's formula in place, the terms are the built-in formula's (from the
    gradients the run used): `formula_value` is what they add up to, and `note` says so when
    the learner's `value` differs, so the page never shows terms that seem not to add up."""
    built_in = products.sum(dtype=torch.float64).item()
    scale = max(products.abs().sum(dtype=torch.float64).item(), abs(value), 1e-30)
    agrees = abs(built_in - value) <= 1e-5 * scale + 1e-12
    out: dict[str, Any] = {"formula_value": _finite(built_in), "agrees": agrees}
    if not agrees:
        out["note"] = (
            f"your formula gives {value:.6g} here; these terms are the built-in formula's "
            f"({formula}), which add up to {built_in:.6g}: the difference is your formula's"
        )
    return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
