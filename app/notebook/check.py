"""A backward text checked against the tensors a Python namespace already holds: the kernel's
own forward ran in plain PyTorch (`retain_grad()` on the named tensors, `loss.backward()`),
and every `d<name>` / `<name>.g` the text writes is compared with `<name>.grad`.

The same interpreter, check and answer as POST /api/program (app/programs): the forward's
tensors play the run's forward, their `.grad` autograd's. No web framework is imported here.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import torch

from app.lab.statements import Executed, ProgramError, parse_program
from app.notebook.forward import Forward, assigned
from app.ops.traced import Traced
from app.programs.check import Outcome
from app.programs.plan import GRAD_PREFIX, GRAD_SUFFIX, Plan, detached
from app.programs.run import answer, run_backward
from app.programs.schemas import ProgramRequest


@dataclass
class MissingGrad:
    """A gradient the text wrote for a tensor that holds no `.grad` to compare it with."""

    tensor: str
    spelling: str
    add: str  # "retain_grad" (an intermediate) or "backward" (loss.backward() not run)


@dataclass
class Report:
    """The check of one backward text: `answer` is POST /api/program's response body."""

    answer: dict[str, Any] | None
    written: dict[str, Any] = field(default_factory=dict)  # names the text wrote -> values
    missing_grad: list[MissingGrad] = field(default_factory=list)
    refused: str | None = None  # a text that cannot be read at all: nothing ran

    @property
    def check(self) -> dict[str, Any]:
        return self.answer["check"] if self.answer else {}

    @property
    def all_close(self) -> bool:
        """Every written gradient within tolerance, and the text ran to its end."""
        return bool(
            self.answer
            and self.check["all_close"]
            and self.answer["backward_error"] is None
            and not self.missing_grad
        )

    @property
    def all_written(self) -> bool:
        return bool(self.answer and self.check["all_written"])

    @property
    def first_failure(self) -> str | None:
        return self.check.get("first_failure")

    def __getitem__(self, name: str) -> dict[str, Any]:
        """One tensor's row of the check: `report["W1"]["allclose"]`."""
        return self.check["tensors"][name]

    def json(self) -> dict[str, Any]:
        """The answer as JSON would carry it (NaN and infinities as null), with the notebook's
        own `missing_grad` lines where a gradient had nothing to compare with."""
        body = dict(self.answer or {})
        if self.missing_grad:
            body["missing_grad"] = [
                {"tensor": m.tensor, "spelling": m.spelling, "add": m.add, "message": line}
                for m, line in zip(self.missing_grad, self.missing_lines(each=True))
            ]
        if self.refused:
            body["refused"] = self.refused
        return orjson.loads(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY))

    def missing_lines(self, loss: str = "loss", each: bool = False) -> list[str]:
        """What to add, one line per kind (or per tensor with `each`), never a traceback."""
        return missing_lines(self.missing_grad, loss, each)


def missing_lines(missing: list[MissingGrad], loss: str = "loss", each: bool = False) -> list[str]:
    groups = [[m] for m in missing] if each else [
        [m for m in missing if m.add == kind] for kind in ("retain_grad", "backward")
    ]  # fmt: skip
    lines = []
    for group in filter(None, groups):
        names = [m.tensor for m in group]
        spelled = ", ".join(m.spelling for m in group)
        has = f"{names[0]} has" if len(names) == 1 else f"{', '.join(names)} have"
        if group[0].add == "retain_grad":
            calls = (
                f"`{names[0]}.retain_grad()`"
                if len(names) == 1
                else f"`for t in [{', '.join(names)}]: t.retain_grad()`"
            )
            lines.append(
                f"{spelled}: {has} no .grad to check against: add {calls} to the forward "
                f"cell, before `{loss}.backward()`, and run it again"
            )
        else:
            lines.append(
                f"{spelled}: {has} no .grad yet: run `{loss}.backward()` after the forward, "
                "then this cell again"
            )
    return lines


# --------------------------------------------------------------------------- the namespace


def _tensors(namespace: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The namespace's tensors under their public names (a notebook's `_`, `_3` skipped)."""
    return {
        n: v
        for n, v in namespace.items()
        if isinstance(v, torch.Tensor) and not n.startswith("_") and n.isidentifier()
    }


def _reached(loss: Any) -> Callable[[torch.Tensor], bool] | None:
    """Whether a tensor is in the loss's graph: a name an older forward left in the kernel
    (the `t` of an earlier `for t in [...]: t.retain_grad()`) is no tensor of this loss's.
    None where the loss is not a tensor with a graph."""
    if not isinstance(loss, torch.Tensor) or loss.grad_fn is None:
        return None
    nodes: set[int] = set()
    leaves: set[int] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in nodes:
            continue
        nodes.add(id(node))
        if (variable := getattr(node, "variable", None)) is not None:  # AccumulateGrad: a leaf
            leaves.add(id(variable))
        stack.extend(fn for fn, _ in node.next_functions)
    return lambda t: id(t) in leaves if t.is_leaf else id(t.grad_fn) in nodes


def _grad(t: torch.Tensor) -> torch.Tensor | None:
    """`t.grad`, without PyTorch's warning about a non-leaf that did not retain it."""
    return t.grad if (t.is_leaf or t.retains_grad) else None


def _canonical(tensors: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, str]:
    """One name per tensor object: `for t in [...]: t.retain_grad()` leaves `t` holding the
    last one, which is not a second tensor to check. The name the text writes a gradient
    for wins, then the longest name, then the first."""
    by_id: dict[int, list[str]] = {}
    for name, t in tensors.items():
        by_id.setdefault(id(t), []).append(name)
    chosen = {}
    for names in by_id.values():
        best = min(names, key=lambda n: (n not in wanted, -len(n), names.index(n)))
        for n in names:
            chosen[n] = best
    return chosen


def _grad_targets(source: str, candidates: set[str]) -> set[str]:
    """The tensors a text writes gradients for, read from its words (before it runs)."""
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*(?:\.g\b)?", source))
    return {n for n in candidates if GRAD_PREFIX + n in words or n + GRAD_SUFFIX in words}


# --------------------------------------------------------------------------- the check


def check(
    backward: str,
    namespace: Mapping[str, Any],
    *,
    loss: str = "loss",
    max_cells: int = 4096,
    forward: Forward | None = None,
) -> Report:
    """Check the backward text against the namespace's tensors and their `.grad`.

    `report.all_close` is the verdict; `report.answer` is the check exactly as POST
    /api/program answers it; `report.written` holds the names the text wrote (gradients as
    the learner spelled them, and helpers), to put back in the namespace. `forward`: what a
    `%%forward` cell ran, where the namespace still holds what it left (its shape flow is
    drawn, its text read for the hints).
    """
    start = time.perf_counter()
    try:
        program = parse_program(backward, "backward")
    except ProgramError as err:
        return Report(None, refused=f"line {err.line} of the backward: {err}")
    every = _tensors(namespace)
    needs_grad = {n for n, t in every.items() if t.requires_grad and t.is_floating_point()}
    # a tensor outside the loss's graph (an older forward's) is a row only where the text
    # writes its gradient, and then its .grad is not this loss's: run the backward again
    reached = _reached(namespace.get(loss))
    stale = {n for n in needs_grad if reached is not None and not reached(every[n])}
    needs_grad -= stale - _grad_targets(backward, stale)
    # what this text writes is its own, not the forward's, even where an earlier cell (or
    # this one, run before) left the name in the kernel; a forward tensor stays refused
    own = assigned(program) - needs_grad
    earlier = {GRAD_PREFIX + n for n in needs_grad}  # gradients earlier cells left, read only
    canonical = _canonical(every, _grad_targets(backward, needs_grad))
    tensors = {n: t for n, t in every.items() if canonical[n] == n and n not in own | earlier}
    has_grad = [n for n in tensors if n in needs_grad]
    env: dict[str, Any] = {
        n: v
        for n, v in namespace.items()
        if not n.startswith("_")
        and n not in own
        and (isinstance(v, (bool, int, float)) or (isinstance(v, torch.Tensor) and n in every))
    }
    env = {n: detached(Traced(v, n)) if isinstance(v, torch.Tensor) else v for n, v in env.items()}
    plan = Plan(
        forward=parse_program(_forward_facts(tensors), "forward"),
        backward=program,
        forward_lines={},
        backward_lines={},
        has_grad=has_grad,
        intermediates=[n for n in tensors if not tensors[n].is_leaf],
        stops_at=None,
        seconds=0.0,
        bytes=0,
        rerun=False,
        known=frozenset(tensors),
    )
    if forward is not None and forward.current(namespace):
        plan.forward, plan.forward_lines = forward.program, forward.lines
        plan.forward_reads = forward.reads
        plan.intermediates = [n for n in forward.assigned if n in tensors]
        plan.known = frozenset([*tensors, *forward.inputs, *forward.assigned])
    bwd, error = run_backward(plan, env, lambda: None)
    plan.backward_lines = _traced_lines(plan, env, bwd.executed)
    written: dict[str, Any] = {}
    for tensor, value in bwd.gradients.items():
        written[bwd.spelling.get(tensor, GRAD_PREFIX + tensor)] = value.t
    for name, value in bwd.scope.items():
        written[name] = value.t if isinstance(value, Traced) else value

    missing: list[MissingGrad] = []
    autograd: dict[str, torch.Tensor] = {}
    for name in has_grad:
        g = None if name in stale else _grad(tensors[name])
        if g is not None:
            autograd[name] = g.detach()
        elif name in bwd.gradients:
            t = tensors[name]
            missing.append(
                MissingGrad(name, bwd.spelling.get(name, GRAD_PREFIX + name),
                            "backward" if t.is_leaf or t.retains_grad or name in stale
                            else "retain_grad")
            )  # fmt: skip
    plan.has_grad = [n for n in has_grad if n in autograd]
    loss_value = namespace.get(loss)
    main = Outcome(
        inputs={n: t.detach() for n, t in tensors.items() if t.is_leaf},
        forward={n: Traced(t.detach(), n) for n, t in tensors.items() if not t.is_leaf},
        loss=float(loss_value.detach())
        if isinstance(loss_value, torch.Tensor) and loss_value.numel() == 1
        else None,
        autograd=autograd,
        manual={n: g.t for n, g in bwd.gradients.items() if n in autograd},
        lines=bwd.lines,
        spelling=bwd.spelling,
        helpers=dict(bwd.scope),
        error=error,
        rounding=_rounding(plan, env, bwd.gradients, autograd),
    )
    # the widget draws autograd's map and the difference's beside the learner's
    req = ProgramRequest(forward="", backward=backward, loss=_loss_name(loss), max_cells=max_cells,
                         reference_heatmaps=True)  # fmt: skip
    body = answer(req, plan, main, None, (time.perf_counter() - start) * 1e3)
    return Report(body, written=written, missing_grad=missing)


def _forward_facts(tensors: dict[str, torch.Tensor]) -> str:
    """The forward lines the check's hints read, recovered from autograd's graph where the
    kernel's forward left no text: `h = torch.tanh(hpre)` for a named tanh of a named tensor
    (so a tanh derivative taken from its input is named as on the page)."""
    made_by = {id(t.grad_fn): n for n, t in tensors.items() if t.grad_fn is not None}
    lines = []
    for name, t in tensors.items():
        fn = t.grad_fn
        if fn is None or fn.name() != "TanhBackward0" or not fn.next_functions:
            continue
        source = made_by.get(id(fn.next_functions[0][0]))
        if source is not None:
            lines.append(f"{name} = torch.tanh({source})")
    return "\n".join(lines)


def _traced_lines(
    plan: Plan, env: dict[str, Any], executed: dict[int, Executed]
) -> dict[int, Executed]:
    """Each line with its steps (shapes, broadcasts, bytes): the steps are recorded on meta
    tensors, as POST /api/program's dry run records them, so the text runs once more there."""
    meta = {
        n: Traced(torch.empty_like(v.t, device="meta"), v.expr) if isinstance(v, Traced) else v
        for n, v in env.items()
    }
    dry, _ = run_backward(plan, meta, lambda: None)
    return {line: dry.executed.get(line, entry) for line, entry in executed.items()}


def _rounding(
    plan: Plan, env: dict[str, Any], manual: dict[str, Traced], autograd: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Each gradient's rounding: the backward rerun in float64 over the same values. The
    kernel's forward cannot be rerun, so autograd's side is taken to round as much as the
    learner's (a gradient that cancels to about 0, a bias before a batchnorm, is then judged
    by its rounding; a wrong formula rounds no more than a right one, so it is not excused)."""
    if not any(g.dtype == torch.float32 for g in autograd.values()):
        return {}
    env64 = {
        n: Traced(v.t.double(), v.expr) if isinstance(v, Traced) and v.t.is_floating_point() else v
        for n, v in env.items()
    }
    bwd64, _ = run_backward(plan, env64, lambda: None)
    noise = {}
    for name, g in manual.items():
        g64 = bwd64.gradients.get(name)
        if name not in autograd or g64 is None or g64.t.shape != g.t.shape:
            continue
        if not g.t.is_floating_point() or not g64.t.is_floating_point() or not g.t.numel():
            continue
        diff = float((g.t.double() - g64.t.double()).abs().max())
        noise[name] = 2 * diff if math.isfinite(diff) else 0.0
    return noise


def _loss_name(loss: str) -> str:
    return loss if loss.isidentifier() and loss[:1].isalpha() else "loss"
