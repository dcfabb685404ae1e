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

from fastapi.exceptions import RequestValidationError

from app.check.autograd import RECHECK_MAX_BYTES
from app.cost.work import ELEMENTWISE_BYTES, MATMUL_FLOPS, WORK_LIMIT_S
from app.cost.work import estimate as estimate_work
from app.engine.tensors import DTYPES, input_specs, layer_sizes, lead_shape
from app.lab.formulas import is_view
from app.ops.linear import chunk_rows
from app.views.heatmap import JSON_BYTES_PER_CELL, heatmap_cap

ITEMSIZE = {name: dtype.itemsize for name, dtype in DTYPES.items()}


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
    """Peak bytes of one linear layer's broadcast product under `strategy`: one chunk."""
    if strategy != "broadcast":
        return 0
    rows = min(n_rows, chunk_rows(fan_in, fan_out, itemsize, chunk_bytes))
    return rows * fan_in * fan_out * itemsize


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


def estimate(cfg, forward: list[dict], backward: list[dict], chunk_bytes: int) -> Estimate:
    """An upper bound of a run's peak bytes, from its traces (shapes only)."""
    itemsize = ITEMSIZE[cfg.dtype]
    specs = input_specs(cfg)
    inputs = sum(math.prod(s.shape) * (8 if s.integer else itemsize) for s in specs)
    params = sum(math.prod(s.shape) * itemsize for s in specs if s.role == "param")
    activations = sum(math.prod(entry["shape"]) * itemsize for entry in forward)
    float_inputs = sum(math.prod(s.shape) * itemsize for s in specs if s.role != "target")
    gradients = float_inputs + activations  # d loss / d every float tensor
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
        fd += 2 * max((e["bytes"] for e in backward if e.get("source") == "user"), default=0)
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
    # a small run that fails its check runs again in the other precision (check.py)
    small = inputs + gradients <= RECHECK_MAX_BYTES
    recheck = run * (12 - itemsize) // itemsize if small else 0
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


def _refuse(kind: str, field: str, msg: str, cfg, **ctx) -> None:
    """FastAPI's own 422 shape, naming the field to change."""
    raise RequestValidationError(
        [
            {
                "type": kind,
                "loc": ("body", field),
                "msg": msg,
                "input": getattr(cfg, field),
                "ctx": ctx,
            }
        ]
    )


def widest_field(cfg) -> str:
    """The width field whose weight matrices hold the most parameters."""
    widths = [cfg.in_features, *cfg.hidden, cfg.out_features]
    owners = ["in_features", *["hidden"] * len(cfg.hidden), "out_features"]
    share = dict.fromkeys(owners, 0)
    for k in range(len(widths) - 1):  # each matrix counts for the wider of its two sides
        owner = owners[k] if widths[k] >= widths[k + 1] else owners[k + 1]
        share[owner] += widths[k] * widths[k + 1]
    return max(share, key=share.get)


def round_down(n: float) -> int:
    """To two significant digits, at least 1: 793.4 -> 790, 12345 -> 12000."""
    if n < 1:
        return 1
    step = 10 ** max(0, len(str(int(n))) - 2)
    return int(n) // step * step


def refuse_over_budget(cfg, est: Estimate, per_row: Estimate, budget: int) -> None:
    """422 naming the field to shrink when the estimate is over the budget.

    `per_row` is the estimate of the same network at batch 1: if even that is over the
    budget the widths are to blame, else the batch is.
    """
    if est.total <= budget:
        return
    field = widest_field(cfg) if per_row.total > budget else "batch"
    advice = f"reduce {field}"
    rows = math.prod(lead_shape(cfg.batch))
    if field == "batch" and rows > 1:
        # the estimate grows about linearly with the rows: fixed + rows x per_row_bytes
        per_row_bytes = (est.total - per_row.total) / (rows - 1)
        fixed = per_row.total - per_row_bytes
        fitting = 0.98 * (budget - fixed) / per_row_bytes if per_row_bytes > 0 else rows
        advice = (
            f"reduce batch to about {round_down(fitting)} rows or fewer, or {widest_field(cfg)}"
        )
    _refuse(
        "memory_budget",
        field,
        f"this run would need about {human_bytes(est.total)}, over the server's memory budget "
        f"of {human_bytes(budget)} per run (BROADPROP_MEMORY_BUDGET_BYTES); {advice}",
        cfg,
        estimated_bytes=est.total,
        budget_bytes=budget,
    )


def refuse_too_much_work(cfg, chunk_bytes: int = 4 << 20) -> None:
    """422 for runs whose time, not memory, is out of bounds (app/cost/work.py counts every pass):
    they would hold a run slot too long. The field named is the one whose change brings the
    run within the limit: compare, fd_samples, strategy (the literal broadcast form), else
    batch or the widest width."""
    work = estimate_work(cfg, chunk_bytes)
    if work.total <= WORK_LIMIT_S:
        return

    def fits(**update) -> bool:
        return estimate_work(cfg.model_copy(update=update), chunk_bytes).total <= WORK_LIMIT_S

    if cfg.compare and fits(compare=False):
        field, change = "compare", "turn compare off"
    elif cfg.fd_samples and fits(fd_samples=0, compare=False):
        field, change = "fd_samples", "reduce fd_samples, batch or the widths"
    elif getattr(cfg, "formulas", None) and fits(formulas={}, fd_samples=0, compare=False):
        field, change = "formulas", "write the formulas without a broadcast intermediate"
    elif cfg.strategy == "broadcast" and fits(strategy="matmul", compare=False, fd_samples=0):
        field, change = (
            "strategy",
            (
                "use strategy einsum or matmul (same gradients, no broadcast intermediate), "
                "or reduce batch or the widths"
            ),
        )
    elif fits(batch=1, compare=False, fd_samples=0, strategy="matmul"):
        field, change = "batch", "reduce batch"
    else:
        field = widest_field(cfg)
        change = f"reduce {field}"
    _refuse(
        "work_limit",
        field,
        f"this run would hold the server for about {work.total:.1f} s (every pass counted: "
        f"backward {work.backward:.1f} s, check {work.check + work.recheck:.1f} s, finite "
        f"differences {work.finite_difference:.1f} s, compare {work.compare:.1f} s, your "
        f"formulas {work.formulas:.1f} s, drawing the tensors {work.draw:.1f} s), over "
        f"the limit of {WORK_LIMIT_S:g} s; {change}",
        cfg,
        estimated_s=round(work.total, 3),
        limit_s=WORK_LIMIT_S,
    )


# A learner's formula runs as written: its work (elements read or written, a stretched view
# counting in full; its matmuls' and einsums' flops) is bounded here on its own (and counted
# in app/cost/work.py with the rest). The flops bound takes as long as the elements' at the rates
# of app/cost/work.py (5 s in float32).
MAX_FORMULA_ELEMENTS = 2.5e9
MAX_FORMULA_FLOPS = MAX_FORMULA_ELEMENTS * 4 / ELEMENTWISE_BYTES * MATMUL_FLOPS


def formula_passes(cfg) -> int:
    """How often a learner's formula may run in one request: the run itself, and the rerun
    in the other precision (the rounding recheck of a small run, or fd_samples' float64)."""
    return (
        2
        if cfg.fd_samples
        or sum(math.prod(s.shape) for s in input_specs(cfg)) * ITEMSIZE[cfg.dtype] * 2
        <= RECHECK_MAX_BYTES
        else 1
    )


def refuse_formula_cost(cfg, backward: list[dict], budget: int) -> None:
    """422 at formulas.<name>.g when a learner's formula would hold more than the memory
    budget or do more work than the limit (from its meta trace: nothing allocated)."""
    passes = formula_passes(cfg)
    # the rerun in the other precision runs after the run's own pass: its peak is the larger
    # of the two, the float64 one
    widen = 8 // ITEMSIZE[cfg.dtype] if passes > 1 else 1
    for entry in backward:
        if entry.get("source") != "user":
            continue
        key = f"{entry['grad']}.g"
        made = [s for s in entry["steps"] if not is_view(s)]  # an expand takes no memory

        def size(step: dict) -> int:  # with the copy torch makes inside it (a stretched @)
            return step["bytes"] + step.get("temp_bytes", 0)

        biggest = max(made, key=size, default=None)
        copy = " with the contiguous copy torch makes of a stretched operand"
        where = (
            f" (the largest, `{biggest['expr']}`, is {human_bytes(size(biggest))}"
            f"{copy if biggest.get('temp_bytes') else ''})"
            if biggest
            else ""
        )
        advice = (
            "; the same gradient without the broadcast intermediate: torch.einsum or @ "
            "(e.g. l1.g @ w1.T for x.g, x.T @ l1.g for w1.g)"
        )
        held = entry["bytes"] * widen
        if held > budget:
            rerun = " (in float64, as the rounding recheck reruns it)" if widen > 1 else ""
            _refuse_formula(
                key,
                f"its intermediates would take {human_bytes(held)}{rerun}{where}, over the "
                f"server's memory budget of {human_bytes(budget)} per run{advice}",
                cfg,
                "budget",
                bytes=held,
                budget_bytes=budget,
            )
        flops = entry.get("flops", 0) * passes
        if flops > MAX_FORMULA_FLOPS:
            _refuse_formula(
                key,
                f"its matmuls and einsums would take {flops:.2g} flops ({passes} pass(es)), "
                f"over the work limit of {MAX_FORMULA_FLOPS:.2g}{where}",
                cfg,
                "work",
                flops=flops,
                limit=MAX_FORMULA_FLOPS,
            )
        work = entry["work"] * passes
        if work > MAX_FORMULA_ELEMENTS:
            _refuse_formula(
                key,
                f"it would read or write {work:.2g} elements ({passes} pass(es)), over the "
                f"work limit of {MAX_FORMULA_ELEMENTS:.2g}{where}{advice}",
                cfg,
                "work",
                elements=work,
                limit=MAX_FORMULA_ELEMENTS,
            )


def _refuse_formula(key: str, msg: str, cfg, kind: str, **ctx) -> None:
    raise RequestValidationError(
        [
            {
                "type": f"formula_{kind}",
                "loc": ("body", "formulas", key),
                "msg": f"`{key}`: {msg}",
                "input": cfg.formulas.get(key, ""),
                "ctx": {"kind": kind, **ctx},
            }
        ]
    )
