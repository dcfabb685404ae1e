"""One program, end to end: inputs -> forward (under autograd, every named tensor's gradient
retained) -> the learner's backward (no grad, on detached copies) -> a check of every gradient
it wrote -> views.

The dry run that comes first is app/programs/plan.py (`admit`); the check and the views,
app/programs/check.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from app.lab.allowlist import FormulaError
from app.lab.statements import Executed, ProgramError
from app.ops.cancel import RunCancelled, cancel_token, is_allocation_failure
from app.ops.making import Maker
from app.ops.precision import single_precision_as
from app.ops.traced import Traced
from app.programs import follow
from app.programs.check import (
    Outcome,
    check_table,
    gradient_views,
    own_views,
    recheck_float64,
    tensor_table,
)
from app.programs.diagnose import PRECISION_RERUN_MAX_S, diagnose_table
from app.programs.inputs import DTYPES, make_inputs
from app.programs.plan import (
    BackwardRun,
    ForwardRun,
    Plan,
    ProgramRefused,
    admit,
    admit_follow,
    detached,
    error_context,
    followed_tensor,
    line_reads,
)
from app.programs.schemas import ProgramRequest

# the program endpoint reaches the dry run through this module (`programs.admit`, `.Plan`)
__all__ = [
    "Plan",
    "ProgramRefused",
    "admit",
    "admit_follow",
    "answer",
    "execute_float64",
    "execute_once",
    "run",
    "run_backward",
]


# --------------------------------------------------------------------------- the real run


def execute_once(
    req: ProgramRequest,
    plan: Plan,
    dtype: torch.dtype,
    check: Callable[[], None],
    made: tuple[dict[str, Any], torch.Tensor] | None = None,
) -> Outcome:
    """The program run once in `dtype`. `made`: its inputs and the generator's state after
    them (`made_inputs`), shared by the run's executions: each takes fresh float leaves and
    a generator of its own from that state (made here when not given)."""
    inputs_made, state = made if made is not None else made_inputs(req)
    g = torch.Generator()  # the run's one generator: inputs, then draws
    g.set_state(state)
    # the program's own tensors in this pass's dtype; its draws in the run's (so the float64
    # recheck of a float32 run sees the same numbers, widened)
    maker = Maker("cpu", dtype, g, draw_dtype=DTYPES[req.dtype])
    inputs: dict[str, Any] = {}
    for name, value in inputs_made.items():
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                value = value.to(dtype, copy=True)  # a leaf of this execution's own
                if name in plan.has_grad:
                    value.requires_grad_()
            value = Traced(value, name)
        inputs[name] = value
    fwd = ForwardRun(plan.forward, inputs, check, maker=maker)
    with torch.enable_grad():
        fwd.run()
        retained = {}
        for name in plan.has_grad:  # each name's value after the line that last wrote it
            t = fwd.scope[name].t
            if not t.is_leaf:
                t.retain_grad()
            retained[name] = t
        loss = fwd.scope[req.loss].t
        try:
            loss.backward()
        except RuntimeError as err:  # the dry run's meta backward catches these first
            if is_allocation_failure(err):
                raise MemoryError(str(err)) from err
            raise ProgramError(FormulaError(_first_line(err), "formula"), 1, "") from None
    check()
    autograd = {}
    for name, t in retained.items():
        grad = t.grad  # (made without create_graph: it has no history to detach from)
        autograd[name] = grad if grad is not None else torch.zeros_like(t)
    env = {n: detached(v) for n, v in fwd.scope.items()}
    bwd, error = run_backward(plan, env, check, maker)
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
        dropped=bwd.dropped,
    )


def made_inputs(req: ProgramRequest) -> tuple[dict[str, Any], torch.Tensor]:
    """The program's inputs, made from its seed, and the generator's state after them (where
    the program's own draws go on)."""
    g = torch.Generator().manual_seed(req.seed)
    made = make_inputs(req.inputs, req.seed, req.dtype, generator=g)
    return made, g.get_state()


def run_backward(
    plan: Plan, env: dict[str, Any], check: Callable[[], None], maker: Maker | None = None
) -> tuple[BackwardRun, ProgramError | None]:
    """The learner's backward over the forward's detached values, no autograd: what it
    wrote, and the first line that could not run (None when every line ran)."""
    bwd = BackwardRun(plan.backward, env, set(plan.has_grad), check, maker=maker)
    with torch.no_grad():
        try:
            bwd.run()
        except ProgramError as err:
            return bwd, err
        except (IndexError, RuntimeError, ValueError, TypeError) as err:  # real data only
            if is_allocation_failure(err):
                raise MemoryError(str(err)) from err
            return bwd, ProgramError(FormulaError(_first_line(err), "formula"), 0, "")
    return bwd, None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _stops_when(cancel: Any) -> Callable[[], None]:
    """The check polled between a run's statements: RunCancelled once `cancel` is set."""

    def check() -> None:
        if cancel is not None and cancel.is_set():
            raise RunCancelled("the run was stopped")

    return check


def run(req: ProgramRequest, plan: Plan, cancel: Any = None,
        rerun_beside: Callable[[], Outcome | None] | None = None) -> dict[str, Any]:  # fmt: skip
    """The program's answer: the contract's response (app/programs/schemas.py).
    `rerun_beside`: the float64 rerun made elsewhere at the same time (another sandbox worker:
    app/sandbox/worker.py), asked for once the run is done; None from it: made here."""

    check = _stops_when(cancel)
    start = time.perf_counter()
    dtype = DTYPES[req.dtype]
    # the inputs once (a value input's nested list becomes a tensor once, not per execution)
    made = made_inputs(req)
    with cancel_token(cancel):  # polled after every op as well as between statements
        main = execute_once(req, plan, dtype, check, made)
        after_run = time.perf_counter()
        # the gradients' own maps, while a rerun beside is on its way (made here either way)
        drawn = own_views(req, plan, main)
        rerun = None
        if plan.rerun and rerun_beside is not None:
            rerun = rerun_beside()
        if plan.rerun and rerun is None:
            with single_precision_as(torch.float64):
                rerun = execute_once(req, plan, torch.float64, check, made)

    low: list[Outcome] = []  # the program in float32, once, for a float64 run's failures

    def lower() -> Outcome | None:
        """autograd's gradients in float32: float64's rounding (`recheck_float64`) and the
        `precision` diagnosis. Only for a run estimated under PRECISION_RERUN_MAX_S."""
        if req.dtype != "float64" or plan.seconds > PRECISION_RERUN_MAX_S:
            return None
        if not low:
            low.append(execute_once(req, plan, torch.float32, check, made))
        return low[0]

    with cancel_token(cancel):
        out = answer(req, plan, main, rerun, (after_run - start) * 1e3, lower, drawn)
        if req.follow is not None:
            out["follow"] = follow_element(req, plan, main, check)
        return out


def execute_float64(req: ProgramRequest, plan: Plan, cancel: Any = None) -> Outcome:
    """The program's float64 rerun on its own, as `run` makes it (the same inputs, made from
    the seed): what another worker makes beside the run."""
    check = _stops_when(cancel)
    with cancel_token(cancel), single_precision_as(torch.float64):
        return execute_once(req, plan, torch.float64, check)


def follow_element(req: ProgramRequest, plan: Plan, main: Outcome,
                   check: Callable[[], None]) -> dict[str, Any] | None:  # fmt: skip
    """The contract's `follow` (app/programs/follow.py); null when the backward did not write
    that gradient."""
    tensor = followed_tensor(req.follow.grad, set(plan.has_grad))
    if tensor is None or tensor not in main.manual:
        return None
    index = tuple(req.follow.index)
    grad = main.manual[tensor]
    if len(index) != grad.dim() or any(i >= s for i, s in zip(index, grad.shape)):
        return None
    maker = Maker("cpu", DTYPES[req.dtype], torch.Generator().manual_seed(req.seed))
    return follow.follow(plan, main.forward, main.manual, maker, tensor, index, check)


def answer(
    req: ProgramRequest,
    plan: Plan,
    main: Outcome,
    rerun: Outcome | None,
    run_ms: float,
    lower: Callable[[], Outcome | None] = lambda: None,
    drawn: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The contract's response from a run's outcome: the check (with each failure's
    diagnosis), the traces and the views. POST /api/program answers it; the notebook's
    %%backward shows it (app/notebook). `lower`: the same program run in float32, made on
    demand (None where it cannot be); `drawn`: the gradients' own maps, made earlier
    (app/programs/check.py `own_views`)."""
    before_check = time.perf_counter()
    table = check_table(plan, main, rerun, req.loss)
    if not table["all_close"] and (float32 := lower()) is not None:
        table = recheck_float64(table, main, float32)

    def lower_autograd() -> dict[str, torch.Tensor] | None:
        float32 = lower()
        return None if float32 is None else float32.autograd

    diagnose_table(table, plan, main, lower_autograd)  # why each failing gradient is wrong
    after_check = time.perf_counter()
    # the first line that cannot run: the dry run's explanation where both stop at one line
    errors = [e for e in (plan.stops_at, main.error) if e is not None]
    error = min(errors, key=lambda e: e.line or 10**9) if errors else None
    return {
        "loss": main.loss,
        "tensors": tensor_table(req, plan, main),
        **_line_entries(plan),
        "check": table,
        "gradients": gradient_views(req, plan, main, table, drawn),
        "backward_error": _error_entry(error) if error is not None else None,
        "timing": {"run_ms": run_ms, "check_ms": (after_check - before_check) * 1e3},
    }


def _line_entries(plan: Plan) -> dict[str, list[dict[str, Any]]]:
    """The answer's `forward` and `backward`: the dry run's traces, the same in every answer
    of the plan, so made once (read-only afterwards: the answer is only serialized)."""
    if "lines" not in plan.answered:
        plan.answered["lines"] = {
            "forward": [
                {**_line_entry(e), "reads": line_reads(plan, e.line)}
                for e in plan.forward_lines.values()
            ],
            "backward": [_line_entry(e) for e in plan.backward_lines.values()],
        }
    return plan.answered["lines"]


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
            "kind": err.kind, **error_context(err)}  # fmt: skip
