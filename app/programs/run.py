"""One program, end to end: inputs -> forward (under autograd, every named tensor's gradient
retained) -> the learner's backward (no grad, on detached copies) -> a check of every gradient
it wrote -> views.

Before anything real runs, `admit` dry-runs both texts on meta tensors through the same
interpreter: shapes, bytes and work of every line (loops counted in full), and every refusal
(a 422 at `["body", "forward" | "backward", line]`). A backward line that cannot run is not
refused: it becomes `backward_error`, and the lines before it are run and checked, as a
notebook would have run them.
"""

from __future__ import annotations

import ast
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from app.check.autograd import TOLERANCES, compare
from app.cost.work import OP_S, _elementwise_s, _matmul_s
from app.lab import formulas, hints
from app.lab.allowlist import FormulaError, Pair
from app.lab.statements import Executed, Interpreter, Program, ProgramError, parse_program
from app.ops.cancel import RunCancelled, cancel_token, check_cancelled
from app.ops.traced import Step, Traced
from app.programs.inputs import DTYPES, make_inputs, meta_of
from app.programs.schemas import ProgramRequest
from app.schemas import MAX_RESPONSE_CELLS
from app.views.heatmap import gradient_view, response_max_cells

GRAD_PREFIX = "d"
GRAD_SUFFIX = ".g"
# rerun in float64 to tell a real difference from float32 rounding (the `suspect` verdict)
# when the whole program is estimated under this
SUSPECT_RERUN_MAX_S = 0.6
FINER = 2.0**-29  # float64's unit roundoff over float32's
# kinds of evaluator error that refuse the request (422) rather than stop the backward
REFUSING_KINDS = frozenset({"syntax", "not_allowed", "too_long", "budget", "work"})


class ProgramRefused(Exception):
    """A 422 at `["body", which, line]` (app/api/program.py raises it as FastAPI's own)."""

    def __init__(self, which: str, line: int | None, message: str, kind: str, **ctx: Any):
        super().__init__(message)
        self.which, self.line, self.kind, self.ctx = which, line, kind, ctx


# --------------------------------------------------------------------------- the interpreters


class ForwardRun(Interpreter):
    """The forward: `name = expression` lines over the inputs; each name assigned once, so
    each has one gradient."""

    def __init__(self, program: Program, inputs: dict[str, Any], check: Callable[[], None]):
        super().__init__(program, dict(inputs), [], check)
        self.input_names = set(inputs)
        self.assigned: list[str] = []

    def resolve(self, node: ast.AST, name: str) -> Any:
        if name.endswith(GRAD_SUFFIX):
            self.fail(node, "the forward reads no gradients; .g belongs to the backward", "name")
        if name not in self.scope:
            known = ", ".join([*self.input_names, *self.assigned]) or "none"
            self.fail(
                node,
                f"{name} is not an input and no line above assigns it (known here: {known}); "
                "add it to `inputs`, or assign it first",
                "name",
            )
        return self.scope[name]

    def assign(self, stmt: ast.stmt, name: str, value: Any) -> None:
        if name.endswith(GRAD_SUFFIX):
            self.fail(stmt, "the forward assigns values; gradients (.g) belong to the backward",
                      "not_allowed")  # fmt: skip
        if name in self.input_names:
            self.fail(stmt, f"{name} is an input; the forward makes new names from it",
                      "not_allowed")  # fmt: skip
        if name in self.assigned:
            self.fail(
                stmt,
                f"{name} is assigned twice; in a program every forward name is assigned once, "
                "so that its gradient is one tensor (call the new value another name)",
                "not_allowed",
            )
        if isinstance(value, range):
            self.fail(stmt, "a range is for indexing and loops, not a value", "not_allowed")
        self.assigned.append(name)
        super().assign(stmt, name, value)


class BackwardRun(Interpreter):
    """The learner's backward: reads the forward's tensors (never writes them), writes
    gradients (`d<name>` / `<name>.g`) and helpers of its own."""

    def __init__(
        self,
        program: Program,
        forward: dict[str, Any],
        has_grad: set[str],
        check: Callable[[], None],
    ):
        protected = [v.t for v in forward.values() if isinstance(v, Traced)]
        super().__init__(program, {}, protected, check)
        self.forward = forward
        self.has_grad = has_grad
        self.gradients: dict[str, Traced] = {}  # tensor name -> its gradient, as written
        self.lines: dict[str, list[int]] = {}  # tensor name -> the lines that wrote it
        self.spelling: dict[str, str] = {}  # tensor name -> how the learner named its grad

    def grad_of(self, name: str) -> str | None:
        """The tensor whose gradient `name` is, or None for a helper."""
        if name.endswith(GRAD_SUFFIX):
            return name.removesuffix(GRAD_SUFFIX)
        if name.startswith(GRAD_PREFIX) and name[1:] in self.has_grad:
            return name[1:]
        return None

    def resolve(self, node: ast.AST, name: str) -> Any:
        if name in self.forward:
            return self.forward[name]
        tensor = self.grad_of(name)
        if tensor is not None:
            if tensor not in self.has_grad:
                self.fail(node, self._no_grad(tensor), "name")
            if tensor not in self.gradients:
                self.fail(node, f"{name} is read before any line writes it", "name")
            return self.gradients[tensor]
        if name not in self.scope:
            self.fail(node, f"{name} is not a tensor of the forward, a gradient written above, "
                      "or a helper assigned above", "name")  # fmt: skip
        return self.scope[name]

    def _no_grad(self, tensor: str) -> str:
        if tensor in self.forward:
            return f"{tensor} has no gradient: nothing that needs one flows through it"
        return f"the forward has no tensor {tensor}"

    def assign(self, stmt: ast.stmt, name: str, value: Any) -> None:
        if name in self.forward:
            self.fail(
                stmt,
                f"{name} is the forward's; the backward writes gradients ({GRAD_PREFIX}{name} "
                f"or {name}.g) and helpers of its own",
                "not_allowed",
            )
        tensor = self.grad_of(name)
        if tensor is None:
            self.scope[name] = self.atom(name, value)
            return
        if tensor not in self.has_grad:
            self.fail(stmt, self._no_grad(tensor), "name")
        if not isinstance(value, Traced):
            self.fail(stmt, f"{name} is a gradient: a tensor, not {type(value).__name__}",
                      "not_allowed")  # fmt: skip
        self.gradients[tensor] = self.atom(name, value)
        self.spelling.setdefault(tensor, name)

    def rebind(self, name: str, value: Traced) -> None:
        tensor = self.grad_of(name)
        if tensor is None:
            self.scope[name] = Traced(value.t, name)
            return
        self.gradients[tensor] = Traced(value.t, name)

    def _record(self, stmt: ast.stmt, name: str) -> None:
        """Which gradients the line wrote (assigned, or changed in place), and where."""
        super()._record(stmt, name)
        written = [t for t in map(self.grad_of, name.split(", ")) if t in self.gradients]
        self.executed[stmt.lineno].grad_of = written[0] if written else None
        for tensor in written:
            lines = self.lines.setdefault(tensor, [])
            if stmt.lineno not in lines:
                lines.append(stmt.lineno)


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """What the dry run learned: the traces, the cost, and where the backward stops."""

    forward: Program
    backward: Program
    forward_lines: dict[int, Executed]
    backward_lines: dict[int, Executed]
    has_grad: list[str]  # tensors with a gradient, inputs first, then the forward's order
    intermediates: list[str]  # the forward's names, in order
    stops_at: ProgramError | None  # the first backward line that cannot run
    seconds: float
    bytes: int
    rerun: bool  # a float64 rerun judges `suspect`
    forward_reads: dict[str, list[int]] = field(default_factory=dict)
    known: frozenset[str] = frozenset()  # the inputs' and the forward's names


class _Cost:
    """Seconds and bytes, step by step, as the dry run goes (loops counted in full)."""

    def __init__(self, itemsize: int, seconds_limit: float, bytes_limit: int, which: str):
        self.itemsize, self.seconds_limit, self.bytes_limit = itemsize, seconds_limit, bytes_limit
        self.which = which
        self.seconds = 0.0
        self.peak_temp = 0
        self.kept = 0

    def add(self, entry: Executed, steps: list[Step]) -> None:
        temp = 0
        for step in steps:
            d = step.as_dict()
            flops = formulas.step_flops(d)
            if flops:  # matmuls and einsums at the BLAS rate, as the built-in strategies
                self.seconds += _matmul_s(flops, self.itemsize)
            self.seconds += _elementwise_s(formulas.step_work(d) * self.itemsize)
            self.seconds += OP_S
            if not formulas.is_view(d) and d["action"] != "write":
                temp += d["bytes"] + d.get("temp_bytes", 0)
        self.peak_temp = max(self.peak_temp, temp)
        if entry.runs == 1:
            self.kept += (
                steps[-1].bytes if steps and not formulas.is_view(steps[-1].as_dict()) else 0
            )
        if self.seconds > self.seconds_limit:
            raise ProgramRefused(
                self.which,
                entry.line,
                f"line {entry.line} (`{entry.code}`): the {self.which} would take about "
                f"{self.seconds:.1f} s of work by here, over the limit of "
                f"{self.seconds_limit:.1f} s (loops are counted in full): shrink the shapes, "
                "or write a loop as one tensor operation",
                "work",
                seconds=self.seconds,
                limit_s=self.seconds_limit,
            )
        if self.kept + self.peak_temp > self.bytes_limit:
            raise ProgramRefused(
                self.which,
                entry.line,
                f"line {entry.line} (`{entry.code}`): the {self.which}'s tensors would take "
                f"{_mib(self.kept + self.peak_temp)} by here, over the server's memory budget "
                f"of {_mib(self.bytes_limit)} per run",
                "budget",
                bytes=self.kept + self.peak_temp,
                budget_bytes=self.bytes_limit,
            )


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def _meta_inputs(req: ProgramRequest) -> tuple[dict[str, Any], int]:
    dtype = DTYPES[req.dtype]
    scope: dict[str, Any] = {}
    total = 0
    for name, spec in req.inputs.items():
        info = meta_of(spec)
        if info.shape is None:
            scope[name] = spec.value
            continue
        t = torch.empty(info.shape, dtype=torch.int64 if info.integer else dtype, device="meta")
        if info.grad:
            t.requires_grad_()
        total += t.numel() * t.element_size()
        scope[name] = Traced(t, name)
    return scope, total


def admit(req: ProgramRequest, memory_budget: int, work_limit_s: float) -> Plan:
    """The dry run: every refusal before anything real is made (ProgramRefused)."""
    forward = _parse(req.forward, "forward")
    backward = _parse(req.backward, "backward")
    scope, input_bytes = _meta_inputs(req)
    itemsize = torch.empty((), dtype=DTYPES[req.dtype]).element_size()
    cost = _Cost(itemsize, work_limit_s, memory_budget - input_bytes, "forward")
    fwd = ForwardRun(forward, scope, check_cancelled)
    fwd.on_statement = cost.add
    with torch.enable_grad():
        _run(fwd, "forward")
    loss = _loss_of(req, fwd, forward)
    if not loss.t.requires_grad:
        raise ProgramRefused("forward", _line_of(forward, req.loss), f"{req.loss} does not "
                             "depend on any input with a gradient (grad: true)", "name")  # fmt: skip
    env = {n: _detached(v) for n, v in fwd.scope.items()}
    has_grad = [n for n in req.inputs if _requires_grad(scope.get(n))] + [
        n for n in fwd.assigned if _requires_grad(fwd.scope[n])
    ]
    # the run keeps the forward, autograd's saved tensors and the retained gradients
    forward_bytes = cost.kept
    back_cost = _Cost(
        itemsize, max(0.0, work_limit_s - 3 * cost.seconds),
        memory_budget - input_bytes - 3 * forward_bytes, "backward",
    )  # fmt: skip
    bwd = BackwardRun(backward, env, set(has_grad), check_cancelled)
    bwd.on_statement = back_cost.add
    stops_at = None
    with torch.no_grad():
        try:
            bwd.run()
        except ProgramError as err:
            if err.kind in REFUSING_KINDS:
                raise ProgramRefused(
                    "backward", err.line, str(err), err.kind, **_ctx(err)
                ) from None
            stops_at = err
    seconds = 3 * cost.seconds + back_cost.seconds
    rerun = req.dtype == "float32" and seconds * 2.2 <= min(SUSPECT_RERUN_MAX_S, work_limit_s)
    return Plan(
        forward=forward,
        backward=backward,
        forward_lines=fwd.executed,
        backward_lines=bwd.executed,
        has_grad=has_grad,
        intermediates=list(fwd.assigned),
        stops_at=stops_at,
        seconds=seconds * (2.2 if rerun else 1.0),
        bytes=input_bytes + 3 * forward_bytes + back_cost.kept + back_cost.peak_temp,
        rerun=rerun,
        forward_reads=_reads(forward),
        known=frozenset([*req.inputs, *fwd.assigned]),
    )


def _parse(source: str, which: str) -> Program:
    try:
        return parse_program(source, which)
    except ProgramError as err:
        raise ProgramRefused(which, err.line, str(err), err.kind, **_ctx(err)) from None


def _run(interp: Interpreter, which: str) -> None:
    try:
        interp.run()
    except ProgramError as err:
        raise ProgramRefused(which, err.line, str(err), err.kind, **_ctx(err)) from None


def _ctx(err: FormulaError) -> dict[str, Any]:
    return {k: v for k, v in err.details.items() if k in ("operands", "dim", "sizes", "made",
                                                          "wanted", "expr")}  # fmt: skip


def _loss_of(req: ProgramRequest, fwd: ForwardRun, forward: Program) -> Traced:
    last = forward.body[-1].lineno if forward.body else 1
    if req.loss not in fwd.assigned:
        raise ProgramRefused("forward", last, f"the forward never assigns {req.loss}: end it "
                             f"with `{req.loss} = ...` (the scalar loss)", "name")  # fmt: skip
    loss = fwd.scope[req.loss]
    line = _line_of(forward, req.loss)
    if not isinstance(loss, Traced) or loss.t.numel() != 1 or not loss.t.is_floating_point():
        shape = tuple(loss.t.shape) if isinstance(loss, Traced) else type(loss).__name__
        raise ProgramRefused("forward", line, f"{req.loss} must be a scalar float tensor; it is "
                             f"{shape} (take .mean() or .sum())", "shape")  # fmt: skip
    return loss


def _line_of(program: Program, name: str) -> int:
    for stmt in program.body:
        if isinstance(stmt, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in stmt.targets
        ):
            return stmt.lineno
    return 1


def _reads(program: Program) -> dict[str, list[int]]:
    """name -> the forward lines that read it (a tensor read twice gets two gradients)."""
    reads: dict[str, list[int]] = {}
    for stmt in program.body:
        for node in ast.walk(stmt.value if isinstance(stmt, ast.Assign) else stmt):
            if isinstance(node, ast.Name):
                reads.setdefault(node.id, [])
                if stmt.lineno not in reads[node.id]:
                    reads[node.id].append(stmt.lineno)
    return reads


def _line_reads(plan: Plan, line: int) -> list[str]:
    """The inputs and forward names that forward line `line` reads, in order of first read
    (the edges of the page's shape-flow diagram)."""
    return [n for n, lines in plan.forward_reads.items() if line in lines and n in plan.known]


def _requires_grad(value: Any) -> bool:
    return isinstance(value, Traced) and value.t.requires_grad


def _detached(value: Any) -> Any:
    if isinstance(value, Traced):
        return Traced(value.t.detach(), value.expr)
    if isinstance(value, Pair):
        return Pair(tuple(_detached(v) for v in value))
    return value


# --------------------------------------------------------------------------- the real run


@dataclass
class Outcome:
    """One pass over real tensors: the forward's values, autograd's gradients, the
    learner's, and where the backward stopped."""

    inputs: dict[str, Any]
    forward: dict[str, Any]
    loss: float
    autograd: dict[str, torch.Tensor]
    manual: dict[str, torch.Tensor]
    lines: dict[str, list[int]]
    spelling: dict[str, str]
    helpers: dict[str, Any]
    error: ProgramError | None


def execute_once(
    req: ProgramRequest, plan: Plan, dtype: torch.dtype, check: Callable[[], None]
) -> Outcome:
    made = make_inputs(req.inputs, req.seed, req.dtype)
    inputs: dict[str, Any] = {}
    for name, value in made.items():
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                value = value.to(dtype)
                if name in plan.has_grad:
                    value.requires_grad_()
            value = Traced(value, name)
        inputs[name] = value
    fwd = ForwardRun(plan.forward, inputs, check)
    with torch.enable_grad():
        fwd.run()
        retained = {}
        for name in plan.has_grad:
            t = fwd.scope[name].t
            if not t.is_leaf:
                t.retain_grad()
            retained[name] = t
        loss = fwd.scope[req.loss].t
        loss.backward()
    check()
    autograd = {
        n: (t.grad if t.grad is not None else torch.zeros_like(t)).detach()
        for n, t in retained.items()
    }
    env = {n: _detached(v) for n, v in fwd.scope.items()}
    bwd, error = run_backward(plan, env, check)
    return Outcome(
        inputs={n: v.t.detach() if isinstance(v, Traced) else v for n, v in inputs.items()},
        forward={n: v for n, v in env.items()},
        loss=loss.item(),
        autograd=autograd,
        manual={n: g.t for n, g in bwd.gradients.items()},
        lines=bwd.lines,
        spelling=bwd.spelling,
        helpers=dict(bwd.scope),
        error=error,
    )


def run_backward(
    plan: Plan, env: dict[str, Any], check: Callable[[], None]
) -> tuple[BackwardRun, ProgramError | None]:
    """The learner's backward over the forward's detached values, no autograd: what it
    wrote, and the first line that could not run (None when every line ran)."""
    bwd = BackwardRun(plan.backward, env, set(plan.has_grad), check)
    with torch.no_grad():
        try:
            bwd.run()
        except ProgramError as err:
            return bwd, err
        except (IndexError, RuntimeError, ValueError, TypeError) as err:  # real data only
            return bwd, ProgramError(FormulaError(_first_line(err), "formula"), 0, "")
    return bwd, None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run(req: ProgramRequest, plan: Plan, cancel: Any = None) -> dict[str, Any]:
    """The program's answer: the contract's response (app/programs/schemas.py)."""

    def check() -> None:
        if cancel is not None and cancel.is_set():
            raise RunCancelled("the run was stopped")

    start = time.perf_counter()
    dtype = DTYPES[req.dtype]
    with cancel_token(cancel):  # polled after every op as well as between statements
        main = execute_once(req, plan, dtype, check)
        after_run = time.perf_counter()
        rerun = execute_once(req, plan, torch.float64, check) if plan.rerun else None
    table = _check_table(plan, main, rerun, req.loss)
    after_check = time.perf_counter()
    # the first line that cannot run: the dry run's explanation where both stop at one line
    errors = [e for e in (plan.stops_at, main.error) if e is not None]
    error = min(errors, key=lambda e: e.line or 10**9) if errors else None
    return {
        "loss": main.loss,
        "tensors": _tensor_table(req, plan, main),
        "forward": [
            {**_line_entry(e), "reads": _line_reads(plan, e.line)}
            for e in plan.forward_lines.values()
        ],
        "backward": [_line_entry(e) for e in plan.backward_lines.values()],
        "check": table,
        "gradients": _views(req, plan, main, table),
        "backward_error": _error_entry(error) if error is not None else None,
        "timing": {
            "run_ms": (after_run - start) * 1e3,
            "check_ms": (after_check - after_run) * 1e3,
        },
    }


def _line_entry(entry: Executed) -> dict[str, Any]:
    return {
        "line": entry.line,
        "code": entry.code,
        "target": entry.target,
        "steps": [s.as_dict() for s in entry.steps],
        "runs": entry.runs,
        "grad_of": entry.grad_of,
    }


def _error_entry(err: ProgramError) -> dict[str, Any]:
    message = str(err)
    head = message.splitlines()[0] if message else ""
    hint = head.split("; ", 1)[1] if "; " in head else None
    return {"line": err.line, "code": err.code, "message": message, "hint": hint,
            "kind": err.kind, **_ctx(err)}  # fmt: skip


# --------------------------------------------------------------------------- the check


def _check_table(
    plan: Plan, main: Outcome, rerun: Outcome | None, loss_name: str
) -> dict[str, Any]:
    """Every tensor with a gradient, in the order the backward finishes them (then the
    unwritten ones, from the loss back)."""
    # in the order the gradients are finished (their last write): a gradient built over
    # several lines (`dx = ...`, later `dx += ...`) comes after what its last line used
    written = sorted(main.manual, key=lambda n: (max(main.lines.get(n, [10**9])), n))
    # the loss's own gradient is 1: checked only when the backward writes it
    unwritten = [n for n in reversed(plan.has_grad) if n not in main.manual and n != loss_name]
    order = written + unwritten
    rows: dict[str, dict[str, Any]] = {}
    first_failure = None
    for name in order:
        auto = main.autograd[name]
        rtol, atol_scale = TOLERANCES[auto.dtype]
        if name not in main.manual:
            rows[name] = {"written": False, "shape_ok": False, "exact": False, "allclose": False,
                          "suspect": False, "max_abs_err": None, "max_rel_err": None,
                          "rtol": rtol, "atol": None, "lines": [], "hint": None}  # fmt: skip
            continue
        manual = main.manual[name]
        row: dict[str, Any] = {"written": True, "lines": main.lines.get(name, []),
                               "spelling": main.spelling.get(name), "suspect": False,
                               "hint": None}  # fmt: skip
        if tuple(manual.shape) != tuple(auto.shape) and _same_entries(manual.shape, auto.shape):
            # (64,) written for (1, 64): the same numbers in the same order (PyTorch's
            # allclose, as a notebook's cmp() uses it, broadcasts one onto the other)
            row["shape_note"] = (
                f"{main.spelling.get(name, name)} is {hints.fmt_shape(tuple(manual.shape))}, "
                f"{name} is {hints.fmt_shape(tuple(auto.shape))}: the same entries; "
                "keepdim=True would make the shapes equal too"
            )
            row["made"] = list(manual.shape)
            manual = manual.reshape(auto.shape)
            main.manual[name] = manual
            if rerun is not None and name in rerun.manual:
                rerun.manual[name] = rerun.manual[name].reshape(auto.shape)
        if tuple(manual.shape) != tuple(auto.shape):
            row.update(shape_ok=False, exact=False, allclose=False, max_abs_err=None,
                       max_rel_err=None, rtol=rtol, atol=None,
                       shape=list(manual.shape), wanted=list(auto.shape))  # fmt: skip
            row["hint"] = hints.result_shape(
                main.spelling.get(name, name), tuple(manual.shape), tuple(auto.shape), []
            )
        elif not manual.is_floating_point():
            row.update(shape_ok=True, exact=False, allclose=False, max_abs_err=None,
                       max_rel_err=None, rtol=rtol, atol=None)  # fmt: skip
            row["hint"] = f"{main.spelling.get(name)} is an integer tensor: a gradient is float"
        else:
            noise = _rounding_noise(name, main, rerun)
            result = compare(manual.to(auto.dtype), auto, rounding_noise=noise)
            if noise:
                result["rounding_noise"] = noise
            row.update(result, shape_ok=True)
            row["exact"] = bool(torch.equal(manual.to(auto.dtype), auto))
            if rerun is not None and result["allclose"] and name in rerun.manual:
                m64, a64 = rerun.manual[name], rerun.autograd[name]
                if m64.shape == a64.shape and m64.is_floating_point():
                    # float64's own rounding, scaled from float32's (2**-29 finer): a sum
                    # that cancels to 0 is still noise, a dropped eps is far above it
                    strict = compare(m64.to(a64.dtype), a64, rounding_noise=noise * FINER)
                    if not strict["allclose"]:
                        row["suspect"] = True
                        row["float64_rel_err"] = strict["max_rel_err"]
                        row["why"] = (
                            f"within float32's tolerance, but the same line in float64 still "
                            f"differs from autograd by {strict['max_rel_err']:.1e} (relative), "
                            "far above float64's rounding: the formula is not exactly the "
                            "forward's derivative (a changed eps? n vs n - 1?)"
                        )
            if not row["allclose"]:
                row["hint"] = _slip_hint(name, manual, auto, plan, main)
        if first_failure is None and (not row["allclose"]):
            first_failure = name
        rows[name] = row
    for name, row in rows.items():
        if first_failure and row["written"] and name != first_failure and not row["allclose"]:
            row["after"] = first_failure  # may be wrong only because it uses a wrong gradient
    written_rows = [r for r in rows.values() if r["written"]]
    return {
        "reference": "torch.autograd",
        # the tolerance verdict over what is written; `all_written` says whether that is all
        "all_close": bool(written_rows) and all(r["allclose"] for r in written_rows),
        "all_written": all(r["written"] for r in rows.values()),
        "written": len(written_rows),
        "total": len(rows),
        "suspects": [n for n, r in rows.items() if r.get("suspect")],
        "first_failure": first_failure,
        "tensors": rows,
    }


def _same_entries(a: tuple, b: tuple) -> bool:
    """Shapes that differ only by size-1 dims: one tensor's entries are the other's."""
    return [d for d in a if d != 1] == [d for d in b if d != 1]


def _rounding_noise(name: str, main: Outcome, rerun: Outcome | None) -> float:
    """The rounding error both sides carry: how far each moves between the run's precision
    and float64. A gradient that cancels to about 0 (a bias before a batchnorm) is then
    judged by its rounding, not by its own tiny scale."""
    if rerun is None or name not in rerun.manual:
        return 0.0
    m, m64 = main.manual[name], rerun.manual[name]
    a, a64 = main.autograd[name], rerun.autograd[name]
    if m.shape != m64.shape or not m.is_floating_point() or not m64.is_floating_point():
        return 0.0
    noise = (m.double() - m64.double()).abs().max() + (a.double() - a64).abs().max()
    return float(noise) if math.isfinite(float(noise)) else 0.0


def _slip_hint(
    name: str, manual: torch.Tensor, auto: torch.Tensor, plan: Plan, main: Outcome
) -> str | None:
    """The classic slips of these exercises, recognized from the numbers and the code."""
    spelled = main.spelling.get(name, name)
    reads = plan.forward_reads.get(name, [])
    lines = main.lines.get(name, [])
    scale = _scale(manual, auto)
    if len(reads) > 1 and len(lines) == 1:
        return (
            f"{name} is used by {len(reads)} forward lines ({', '.join(map(str, reads))}): its "
            f"gradient is the sum of what each use sends back. Did one use's share get lost? "
            f"Accumulate the second with `{spelled} += ...`"
        )
    if scale is not None:
        for n in sorted({d for t in main.forward.values() if isinstance(t, Traced)
                         for d in t.t.shape if d > 2}):  # fmt: skip
            for ratio, what in ((n / (n - 1), "n / (n - 1)"), ((n - 1) / n, "(n - 1) / n")):
                if abs(scale - ratio) < 1e-3 * ratio:
                    return (
                        f"{spelled} is off by the factor {what} with n = {n}: Bessel's "
                        "correction. The forward's variance and the backward must divide by "
                        "the same n - 1 (or n)"
                    )
    for stmt in plan.forward.body:
        if not isinstance(stmt, ast.Assign) or not isinstance(stmt.targets[0], ast.Name):
            continue
        out = stmt.targets[0].id
        pre = _tanh_argument(stmt.value)
        if pre == name:
            code = " ".join(
                plan.backward_lines[ln].code for ln in lines if ln in plan.backward_lines
            )
            if re.search(rf"\b{re.escape(pre)}\s*\*\*\s*2", code):
                return (
                    f"tanh's derivative is 1 - tanh(x)**2, taken from tanh's output: "
                    f"1 - {out}**2, not 1 - {pre}**2"
                )
    return None


def _tanh_argument(node: ast.expr) -> str | None:
    """`pre` in `torch.tanh(pre)` or `pre.tanh()`."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
        return None
    if node.func.attr != "tanh":
        return None
    if isinstance(node.func.value, ast.Name) and node.func.value.id in ("torch", "F"):
        arg = node.args[0] if node.args else None
    else:
        arg = node.func.value
    return arg.id if isinstance(arg, ast.Name) else None


def _scale(manual: torch.Tensor, auto: torch.Tensor) -> float | None:
    """The factor c with manual ~= c * autograd, when one factor explains the difference."""
    a, m = auto.double().reshape(-1), manual.double().reshape(-1)
    denom = float((a * a).sum())
    if denom == 0 or not math.isfinite(denom):
        return None
    c = float((a * m).sum()) / denom
    residual = float((m - c * a).abs().max())
    return c if residual <= 1e-4 * float(a.abs().max()) * max(1.0, abs(c)) else None


# --------------------------------------------------------------------------- views


def _tensor_table(req: ProgramRequest, plan: Plan, main: Outcome) -> dict[str, Any]:
    table: dict[str, Any] = {}

    def add(name: str, t: Any, role: str) -> None:
        if isinstance(t, Traced):
            t = t.t
        if isinstance(t, torch.Tensor):
            table[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                           "role": role, "bytes": t.numel() * t.element_size()}  # fmt: skip

    for name, value in main.inputs.items():
        add(name, value, "param" if name in plan.has_grad else "input")
    for name in plan.intermediates:
        add(name, main.forward.get(name), "loss" if name == req.loss else "intermediate")
    for tensor, value in main.manual.items():
        add(main.spelling.get(tensor, GRAD_PREFIX + tensor), value, "gradient")
    for name, value in main.helpers.items():
        if name not in table:
            add(name, value, "helper")
    return table


def _views(req: ProgramRequest, plan: Plan, main: Outcome, table: dict) -> dict[str, Any]:
    names = list(table["tensors"])
    sizes = [main.autograd[n].numel() for n in names]
    cells = response_max_cells(sizes, req.max_cells, 4, MAX_RESPONSE_CELLS)
    views: dict[str, Any] = {}
    for name in names:
        row = table["tensors"][name]
        auto = main.autograd[name]
        if row["written"] and row["shape_ok"] and main.manual[name].is_floating_point():
            tol = (row["rtol"], row["atol"]) if row.get("atol") is not None else None
            view = gradient_view(main.manual[name].to(auto.dtype), cells, auto, tol)
            view["source"] = "manual"
        elif row["written"] and main.manual[name].is_floating_point():
            view = gradient_view(main.manual[name], cells)
            view["source"] = "manual"
            view["autograd"] = gradient_view(auto, cells)
        else:
            view = gradient_view(auto, cells)
            view["source"] = "autograd"
        views[name] = view
    return views
