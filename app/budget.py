"""The memory a run will take, estimated from shapes alone before anything is allocated.

A run holds: the inputs; every forward output; the manual gradients; the autograd check's
saved activations and gradients (its leaves share the inputs' storage); the largest
broadcast chunk a linear backward materializes; and the float64 copies the views make.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastapi.exceptions import RequestValidationError

from app.tensors import DTYPES, input_specs, layer_sizes

ITEMSIZE = {name: dtype.itemsize for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Estimate:
    total: int
    inputs: int
    activations: int
    gradients: int
    broadcast_chunk: int
    views: int
    parameters: int  # the part that does not grow with the batch


def chunk_peak(fan_in: int, fan_out: int, itemsize: int, chunk_bytes: int, strategy: str) -> int:
    """Peak bytes of one linear layer's backward intermediates under `strategy`."""
    if strategy != "broadcast":
        return 0
    row = fan_in * fan_out * itemsize  # one row of the (N, in, out) product
    return max(row, (chunk_bytes // row) * row) if row <= chunk_bytes else row


def estimate(cfg, forward_shapes: list[list[int]], chunk_bytes: int) -> Estimate:
    itemsize = ITEMSIZE[cfg.dtype]
    specs = input_specs(cfg)
    inputs = sum(math.prod(s.shape) * (8 if s.integer else itemsize) for s in specs)
    params = sum(math.prod(s.shape) * itemsize for s in specs if s.role == "param")
    activations = sum(math.prod(shape) * itemsize for shape in forward_shapes)
    float_inputs = sum(math.prod(s.shape) * itemsize for s in specs if s.role != "target")
    gradients = float_inputs + activations  # d loss / d every float tensor
    sizes = layer_sizes(cfg.in_features, cfg.hidden, cfg.out_features)
    strategy = "broadcast" if getattr(cfg, "compare", False) else cfg.strategy  # compare runs all
    chunk = max(chunk_peak(i, o, itemsize, chunk_bytes, strategy) for i, o in sizes)
    largest_grad = max(math.prod(s.shape) for s in specs if s.role != "target")
    views = 3 * 8 * largest_grad  # float64 stats copy, padded copy and counts of one gradient
    # manual pass + autograd check: each holds its activations and gradients
    total = inputs + 2 * activations + 2 * gradients + 2 * chunk + views
    return Estimate(total, inputs, activations, gradients, chunk, views, params)


def human_bytes(n: float) -> str:
    """Binary units, as memory is sized: 1073741824 -> '1.0 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def refuse_over_budget(cfg, est: Estimate, per_row: Estimate, budget: int) -> None:
    """422 naming the field to shrink when the estimate is over the budget.

    `per_row` is the estimate of the same network at batch 1: if even that is over the
    budget the widths are to blame, else the batch is.
    """
    if est.total <= budget:
        return
    if per_row.total > budget:
        widths = {"in_features": cfg.in_features, "out_features": cfg.out_features}
        if cfg.hidden:
            widths["hidden"] = max(cfg.hidden)
        field = max(widths, key=widths.get)
    else:
        field = "batch"
    raise RequestValidationError(
        [
            {
                "type": "memory_budget",
                "loc": ("body", field),
                "msg": (
                    f"this run would need about {human_bytes(est.total)}, over the server's "
                    f"memory budget of {human_bytes(budget)} per run "
                    f"(BROADPROP_MEMORY_BUDGET_BYTES); reduce {field}"
                ),
                "input": getattr(cfg, field),
                "ctx": {"estimated_bytes": est.total, "budget_bytes": budget},
            }
        ]
    )
