"""The passes one run makes, decided once from its config and its traces (shapes only).

app/cost/budget.py costs a plan in bytes, app/cost/work.py in seconds, app/cost/admission.py
refuses from both; the run (app/runs/pipeline.py, app/check) makes the same passes. Whether
a run gets the rounding recheck is decided by app/check/recheck.py alone, from the bytes it
weighs there (`held_bytes`), for the costs here and for the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.check.recheck import gets_recheck, held_bytes
from app.engine.tensors import input_specs
from app.engine.traces import trace
from app.schemas import MAX_RESPONSE_CELLS
from app.views.heatmap import response_max_cells

Traces = tuple[list[dict], list[dict]]  # the forward and backward traces


@dataclass(frozen=True)
class RunPlan:
    """What one run of `cfg` does: its passes, and the sizes the costs are made of."""

    cfg: object
    forward: list[dict]  # the forward trace: every op's output shape
    backward: list[dict]  # the backward trace, the learner's formulas' meta runs included
    itemsize: int  # bytes per float in the run's precision
    other_itemsize: int  # the precision of the recheck and of fd's float64 rerun
    inputs: int  # bytes of x, target and the parameters (an integer target at 8)
    activations: int  # bytes of every forward output
    float_inputs: int  # bytes of the inputs that get a gradient (all but the target)
    held: int  # bytes of the tensors and the manual gradients: what gets_recheck weighs
    recheck: bool  # a failing check reruns both sides in the other precision
    fd_rerun: bool  # a float32 run with fd_samples reruns the manual formulas in float64

    @property
    def gradients(self) -> int:
        """Bytes of d loss / d every float tensor."""
        return self.float_inputs + self.activations

    @property
    def user(self) -> list[dict]:
        """The meta-traced entries of the learner's formulas (none without formulas)."""
        return [e for e in self.backward if e.get("source") == "user"]

    @property
    def rerun(self) -> bool:
        """Whether the manual formulas run again in the other precision."""
        return self.recheck or self.fd_rerun

    @property
    def formula_passes(self) -> int:
        """How often a learner's formula may run: the run itself, and the rerun."""
        return 2 if self.rerun else 1


def plan(cfg, traces: Traces | None = None) -> RunPlan:
    """The plan of a run of `cfg`, from its traces (`app.engine.traces.trace`, made here when
    not given: pass the request's own to make it once)."""
    forward, backward = traces if traces is not None else trace(cfg)
    itemsize = 8 if cfg.dtype == "float64" else 4
    specs = input_specs(cfg)
    inputs = sum(math.prod(s.shape) * (8 if s.integer else itemsize) for s in specs)
    float_inputs = sum(math.prod(s.shape) * itemsize for s in specs if s.role != "target")
    activations = sum(math.prod(entry["shape"]) * itemsize for entry in forward)
    held = held_bytes(cfg, forward)  # the run's tensors and its manual gradients
    return RunPlan(
        cfg=cfg,
        forward=forward,
        backward=backward,
        itemsize=itemsize,
        other_itemsize=12 - itemsize,
        inputs=inputs,
        activations=activations,
        float_inputs=float_inputs,
        held=held,
        recheck=gets_recheck(held),
        fd_rerun=cfg.fd_samples > 0 and itemsize == 4,
    )


def heatmap_cap(cfg) -> int:
    """The cap on each heatmap's cells for a run of `cfg`: max_cells, lowered where all the
    response's heatmaps together would pass MAX_RESPONSE_CELLS (the views take the cap as
    given; the budget counts the cells it allows)."""
    sizes = [math.prod(s.shape) for s in input_specs(cfg) if s.role != "target"]
    maps = 4 if cfg.reference_heatmaps else 1  # manual; autograd, difference, tolerance
    return response_max_cells(sizes, cfg.max_cells, maps, MAX_RESPONSE_CELLS)
