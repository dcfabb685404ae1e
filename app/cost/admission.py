"""Whether a run may start: every refusal before a run slot is taken, in one place.

A request's config is traced once (`app.engine.traces.trace`: shapes, and the learner's
formulas dry-run on meta tensors), planned once (`app.cost.plan.plan`), and costed twice
from that plan: in bytes (app/cost/budget.py) and in seconds (app/cost/work.py). Each refusal
is a Refused (FastAPI's 422 shape, answered at the edge), naming the field to change. The API's routes (run, export,
train, program) admit through `admit` and `admit_program` only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.cost.budget import Estimate, human_bytes
from app.cost.budget import estimate as estimate_bytes
from app.cost.plan import RunPlan, Traces, plan
from app.cost.work import (
    ELEMENTWISE_BYTES,
    MATMUL_FLOPS,
    WORK_LIMIT_S,
    Work,
    interpret_s,
)
from app.cost.work import estimate as estimate_work
from app.engine.follow import followable, view_shape
from app.engine.network import Network
from app.engine.tensors import lead_shape
from app.engine.traces import trace
from app.lab import formulas
from app.lab.allowlist import FormulaError
from app.lab.formulas import UnknownGradient, is_view
from app.refusal import Refused


@dataclass(frozen=True)
class Admitted:
    """An accepted run: what it is estimated to take, and the traces it was planned from
    (the run shows them: made once per request)."""

    # what weighs the run for the lanes: without the rounding recheck, which only a failing
    # check runs, and with the Python its formulas take (work.interpret_s)
    seconds: float
    bytes: int
    traces: Traces


def admit(cfg, settings) -> Admitted:
    """422 naming the field and the limit when the run would not fit in memory or would hold
    a run slot for too long (decided from shapes: nothing allocated). The learner's formulas
    are dry-run here, on meta tensors."""
    try:
        traces = trace(cfg)
    except (FormulaError, UnknownGradient) as err:
        formulas.refuse(err, cfg.formulas)
    run = plan(cfg, traces)
    refuse_follow(cfg, run.backward)
    refuse_formula_cost(run, settings.memory_budget_bytes)
    estimate = estimate_bytes(run, settings.chunk_bytes)
    if estimate.total > settings.memory_budget_bytes:
        per_row = estimate_bytes(plan(cfg.model_copy(update={"batch": 1})), settings.chunk_bytes)
        refuse_over_budget(cfg, estimate, per_row, settings.memory_budget_bytes)
    seconds = refuse_too_much_work(run, settings.chunk_bytes)
    lane_s = seconds.total - seconds.recheck + interpret_s(cfg)
    return Admitted(lane_s, estimate.total, traces)


def _refuse(kind: str, field: str, msg: str, cfg, **ctx) -> None:
    """a Refused (FastAPI's 422 shape, answered at the edge), naming the field to change."""
    raise Refused(
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


def refuse_follow(cfg, backward: Sequence[dict[str, Any]]) -> None:
    """For a run with `follow`: 422 at follow.grad (not a gradient this network follows: the
    valid ones listed) or follow.index (wrong rank, or out of range: the dim, its size and
    the value given). From the trace's shapes: nothing allocated."""
    follow = cfg.follow
    if follow is None:
        return
    shapes = followable(Network.from_config(cfg), backward)
    if follow.grad not in shapes:
        _refuse_follow(
            "grad",
            follow.grad,
            f"{follow.grad!r} is not a gradient follow can trace in this network; "
            f"it can follow {', '.join(shapes)}",
        )
    shape = shapes[follow.grad]
    shown = "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"
    if follow.block is not None:
        view = view_shape(shape)
        for part, n in zip(("rows", "cols"), view):
            start, stop = getattr(follow.block, part)
            if not 0 <= start < stop <= n:
                _refuse_follow(
                    "block",
                    follow.block.model_dump(),
                    f"block {part} [{start}, {stop}) is out of range for {follow.grad}'s "
                    f"heatmap view {view}: it needs 0 <= start < stop <= {n}",
                )
        return
    index = list(follow.index)
    if len(index) != len(shape):
        _refuse_follow(
            "index",
            index,
            f"{follow.grad} has shape {shown}: the index needs {len(shape)} entries, "
            f"got {len(index)}",
        )
    for dim, (i, n) in enumerate(zip(index, shape)):
        if not 0 <= i < n:
            _refuse_follow(
                "index",
                index,
                f"index {index} is out of range for {follow.grad} of shape {shown}: "
                f"dim {dim} must be from 0 to {n - 1}, got {i}",
            )


def _refuse_follow(field: str, value: Any, msg: str) -> None:
    raise Refused(
        [{"type": "follow", "loc": ("body", "follow", field), "msg": msg, "input": value}]
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


def refuse_too_much_work(run, chunk_bytes: int = 4 << 20) -> Work:
    """422 for runs whose time, not memory, is out of bounds (app/cost/work.py counts every pass):
    they would hold a run slot too long. The field named is the one whose change brings the
    run within the limit: compare, fd_samples, strategy (the literal broadcast form), else
    batch or the widest width. `run`: a RunPlan (or a config, planned here). Returns the
    estimate of an accepted run."""
    run = run if isinstance(run, RunPlan) else plan(run)
    cfg = run.cfg
    work = estimate_work(run, chunk_bytes)
    if work.total <= WORK_LIMIT_S:
        return work

    def fits(**update) -> bool:
        changed = cfg.model_copy(update=update)
        # the traces hold for every change but the batch's and the formulas'
        traces = None if {"batch", "formulas"} & update.keys() else (run.forward, run.backward)
        return estimate_work(plan(changed, traces), chunk_bytes).total <= WORK_LIMIT_S

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


def refuse_formula_cost(run: RunPlan, budget: int) -> None:
    """422 at formulas.<name>.g when a learner's formula would hold more than the memory
    budget or do more work than the limit (from its meta trace: nothing allocated). It runs
    `run.formula_passes` times: the run's own pass, and the rerun in the other precision (the
    rounding recheck, or fd_samples' float64)."""
    cfg, passes = run.cfg, run.formula_passes
    # the rerun in the other precision runs after the run's own pass: its peak is the larger
    # of the two, the float64 one
    widen = 8 // run.itemsize if passes > 1 else 1
    for entry in run.user:
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
    raise Refused(
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
