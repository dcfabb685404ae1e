"""The memory a run will take, estimated from shapes alone before anything is allocated.

A run holds: the inputs; every forward output; the manual gradients; the autograd check's
saved activations and gradients (its leaves share the inputs' storage); the largest
broadcast chunk a linear backward materializes; the intermediates of the op whose formulas
hold the most at once (a softmax's counts and probs, a norm's xhat and rstd, ...); the
finite-difference check's float64 copies; and what the views make.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.cost.plan import RunPlan, heatmap_cap
from app.engine.tensors import input_specs, layer_sizes, lead_shape
from app.ops.linear import CHUNKS_IN_FLIGHT, chunk_rows, chunks_in_flight, shares_held
from app.views.heatmap import JSON_BYTES_PER_CELL


@dataclass(frozen=True)
class Estimate:
    total: int
    inputs: int
    activations: int
    gradients: int
    broadcast_chunk: int
    transient: int  # the largest op's own intermediates, forward or backward
    finite_difference: int
    recheck: int  # the rounding recheck of a small run whose check failed
    views: int
    parameters: int  # the part that does not grow with the batch


def chunk_peak(
    n_rows: int, fan_in: int, fan_out: int, itemsize: int, chunk_bytes: int, strategy: str
) -> int:
    """Peak bytes of one linear layer's broadcast product under `strategy`: the chunks in
    flight (the run's and its spare thread's), and the (in, out) shares each thread holds
    beyond the one it made (app/ops/linear.py `shares_held`)."""
    if strategy != "broadcast":
        return 0
    # the larger of one whole-cap chunk (no spare) and two half-cap ones (with a spare)
    alone = min(n_rows, chunk_rows(fan_in, fan_out, itemsize, chunk_bytes))
    half = min(n_rows, chunk_rows(fan_in, fan_out, itemsize, chunk_bytes, CHUNKS_IN_FLIGHT))
    row_bytes = fan_in * fan_out * itemsize
    in_flight = chunks_in_flight(n_rows, half, row_bytes, chunk_bytes)
    side_by_side = in_flight * half * row_bytes
    if in_flight > 1:  # (a share is (in, out): the bytes of one row's product)
        side_by_side += in_flight * (shares_held(fan_in, fan_out, itemsize) - 1) * row_bytes
    return max(alone * row_bytes, side_by_side)


VIEW_ACTIONS = frozenset({"unsqueeze", "squeeze", "reshape"})  # views: no new memory


def formula_bytes(entry: dict) -> int:
    """What one traced formula allocates if each step's result is kept, except the linear
    layer's broadcast products, which run chunked (counted by `chunk_peak`). A learner's
    formula runs as written, unchunked: its own count (`bytes`) holds."""
    if entry.get("source") == "user":
        return entry["bytes"]
    return sum(
        step["bytes"]
        for step in entry["steps"]
        if step["action"] not in VIEW_ACTIONS
        and not (entry["op"] == "linear" and step["action"] == "broadcast")
    )


def estimate(plan: RunPlan, chunk_bytes: int) -> Estimate:
    """An upper bound of a run's peak bytes, from its plan (shapes only)."""
    cfg, forward, backward, itemsize = plan.cfg, plan.forward, plan.backward, plan.itemsize
    specs = input_specs(cfg)
    inputs, activations, float_inputs = plan.inputs, plan.activations, plan.float_inputs
    params = sum(math.prod(s.shape) * itemsize for s in specs if s.role == "param")
    gradients = plan.gradients  # d loss / d every float tensor
    sizes = layer_sizes(cfg.in_features, cfg.hidden, cfg.out_features)
    strategy = "broadcast" if cfg.compare else cfg.strategy  # compare runs all three
    n_rows = math.prod(lead_shape(cfg.batch))
    chunk = max(chunk_peak(n_rows, i, o, itemsize, chunk_bytes, strategy) for i, o in sizes)
    transient = max(map(formula_bytes, forward), default=0) + max(
        map(formula_bytes, backward), default=0
    )
    # float64 copies of the inputs and of the activations the perturbed passes rebuild
    fd = (float_inputs + activations) * 8 // itemsize * 2 if cfg.fd_samples else 0
    if cfg.fd_samples and itemsize == 4:  # the learner's formulas rerun in float64: twice the
        fd += 2 * max((e["bytes"] for e in plan.user), default=0)
    largest_grad = max(math.prod(s.shape) for s in specs if s.role != "target")
    # the views' temporaries, and the heatmaps themselves: numpy cells, and the response's
    # JSON text twice (the rendered body, and the server's copy of it as it sends)
    maps = 4 if cfg.reference_heatmaps else 1  # manual; autograd, difference, tolerance
    cap = heatmap_cap(cfg)
    cells = sum(min(math.prod(s.shape), cap) for s in specs if s.role != "target")
    views = 3 * 8 * largest_grad + maps * cells * (8 + 2 * JSON_BYTES_PER_CELL)
    # manual pass + autograd check: each holds its activations and gradients; with the
    # learner's formulas, the built-in gradients too (the suspect verdict compares with them)
    held_grads = 3 if getattr(cfg, "formulas", None) else 2
    run = inputs + 2 * activations + held_grads * gradients + transient
    # a run that gets the rounding recheck (plan.recheck) runs again in the other precision
    recheck = run * plan.other_itemsize // itemsize if plan.recheck else 0
    total = run + 2 * chunk + fd + views + recheck
    return Estimate(
        total, inputs, activations, gradients, chunk, transient, fd, recheck, views, params
    )


def human_bytes(n: float) -> str:
    """Binary units, as memory is sized: 1073741824 -> '1.0 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError
