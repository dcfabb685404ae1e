"""`%%forward`: a forward cell run through Broadprop's own interpreter (app/programs/plan.py's
ForwardRun, as POST /api/program runs a forward) over the kernel's names, under autograd:
every tensor it names keeps its gradient (no `retain_grad()` to write), the inputs' old
`.grad` is cleared, `loss.backward()` runs, and the names stay in the kernel. Each line's
shapes are kept for the next `%%backward`, which then draws the forward's shape flow and reads
the forward's text for its hints.

Which inputs get a gradient: those that require one in the kernel (makemore's parameters);
where none does (the article's tensors, made plainly), every float tensor the cell reads, as
POST /api/program's inputs default; `%%forward --grad w1,b1` names them.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from app.lab.statements import Executed, Program, ProgramError, parse_program
from app.ops.joining import TensorList
from app.ops.making import Maker
from app.ops.traced import Traced
from app.programs.plan import ForwardRun, _reads
from app.programs.run import _first_line
from app.programs.run import _line_entry as line_entry


class ForwardFailed(Exception):
    """A forward cell that cannot run: one line saying why, never a traceback."""


@dataclass
class Forward:
    """What a %%forward cell ran: its text, each line's steps, and the tensors it left."""

    program: Program
    lines: dict[int, Executed]  # line -> its steps (shapes, broadcasts), as the page's dry run
    reads: dict[str, list[int]]  # name -> the lines that read it
    inputs: list[str]  # the kernel's names it read
    grad_inputs: list[str]  # those that got a gradient
    assigned: list[str]  # the names it wrote, in order
    loss_name: str
    loss: float
    made: dict[str, int] = field(default_factory=dict)  # name -> id() of what it left

    def current(self, namespace: Mapping[str, Any]) -> bool:
        """Whether the kernel still holds what this forward left (no later cell rebound it)."""
        return all(id(namespace.get(n)) == i for n, i in self.made.items())

    def answer(self, namespace: Mapping[str, Any]) -> dict[str, Any]:
        """The forward alone, in POST /api/program's shape (no backward, no check yet): what
        the widget draws as the shape flow, and the static page lists."""
        known = {*self.inputs, *self.assigned}
        tensors = {}
        for n in [*self.inputs, *self.assigned]:
            t = namespace.get(n)
            if isinstance(t, torch.Tensor):
                role = ("param" if n in self.grad_inputs else "input") if n in self.inputs else (
                    "loss" if n == self.loss_name else "intermediate")  # fmt: skip
                tensors[n] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                              "role": role, "bytes": t.numel() * t.element_size()}  # fmt: skip
        forward = [
            {
                **line_entry(e),
                "reads": [n for n, at in self.reads.items() if e.line in at and n in known],
            }  # fmt: skip
            for e in self.lines.values()
        ]
        return {"loss": self.loss, "tensors": tensors, "forward": forward, "backward": [],
                "check": None, "gradients": {}, "backward_error": None}  # fmt: skip


def assigned(program: Program) -> set[str]:
    """The plain names a text binds: `x = ...`, `x += ...`, `x[i] = ...`, `for k in ...`."""

    def bound(target: ast.expr) -> list[str]:
        if isinstance(target, ast.Name):
            return [target.id]
        if isinstance(target, ast.Subscript):  # `dC[Xb[k, j]] += ...` writes into dC
            return bound(target.value)
        if isinstance(target, (ast.Tuple, ast.List)):
            return [n for t in target.elts for n in bound(t)]
        return []  # `x.g = ...`: an attribute, not a name of the kernel's

    names: set[str] = set()
    for node in (n for stmt in program.body for n in ast.walk(stmt)):
        if isinstance(node, ast.Assign):
            names.update(n for t in node.targets for n in bound(t))
        elif isinstance(node, (ast.AugAssign, ast.For)):
            names.update(bound(node.target))
    return names


def _read_names(program: Program) -> list[str]:
    return list(
        dict.fromkeys(
            node.id
            for stmt in program.body
            for node in ast.walk(stmt)
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
        )
    )


def _plain(value: Any) -> Any:
    """A value of the interpreter's as the kernel holds it: tensors, lists, tuples, numbers."""
    if isinstance(value, Traced):
        return value.t
    if isinstance(value, TensorList):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def _float_dtype(inputs: dict[str, Any]) -> torch.dtype:
    dtypes = {v.dtype for v in inputs.values() if isinstance(v, torch.Tensor)}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def run_forward(
    source: str, namespace: dict[str, Any], loss: str = "loss", grad: list[str] | None = None
) -> Forward:
    """Run the forward over the namespace's names, then `loss.backward()`; the names it writes
    are put in the namespace. `grad`: the inputs that get a gradient, where the kernel's own
    requires_grad should not decide. ForwardFailed (one line) where it cannot run."""
    try:
        program = parse_program(source, "forward")
    except ProgramError as err:
        raise ForwardFailed(f"line {err.line} of the forward: {err}") from None
    writes = assigned(program)
    inputs = {
        n: namespace[n]
        for n in _read_names(program)
        if n in namespace
        and n not in writes
        and not n.startswith("_")
        and (isinstance(namespace[n], (torch.Tensor, bool, int, float)))
    }
    floats = [n for n, v in inputs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if grad is not None:
        if unknown := [n for n in grad if n not in floats]:
            raise ForwardFailed(f"--grad {', '.join(unknown)}: not a float tensor this forward "
                                f"reads (it reads {', '.join(floats) or 'none'})")  # fmt: skip
        grad_inputs = list(grad)
    else:
        grad_inputs = [n for n in floats if inputs[n].requires_grad] or floats
    dtype = _float_dtype(inputs)

    def scope(device: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for n, v in inputs.items():
            if not isinstance(v, torch.Tensor):
                out[n] = v
                continue
            t = torch.empty_like(v, device="meta") if device == "meta" else v
            if n in grad_inputs and device == "meta":
                t.requires_grad_()
            out[n] = Traced(t, n)
        return out

    # the dry run on meta tensors: each line's steps, as POST /api/program's trace
    dry = ForwardRun(program, scope("meta"), lambda: None, maker=Maker("meta", dtype))
    try:
        with torch.enable_grad():
            dry.run()
    except ProgramError as err:
        raise ForwardFailed(f"line {err.line} of the forward: {err}") from None
    if loss not in dry.assigned:
        raise ForwardFailed(f"the forward never assigns {loss}: end it with `{loss} = ...` "
                            "(the scalar loss), or name yours with --loss")  # fmt: skip
    out = dry.scope[loss]
    if not isinstance(out, Traced) or out.t.numel() != 1 or not out.t.is_floating_point():
        raise ForwardFailed(f"{loss} must be a scalar float tensor (take .mean() or .sum())")

    for n in grad_inputs:  # as makemore's `p.grad = None`, then `p.requires_grad = True`
        t = inputs[n]
        t.grad = None
        if t.is_leaf:
            t.requires_grad_()
        else:
            t.retain_grad()
    fwd = ForwardRun(program, scope("cpu"), lambda: None, maker=Maker("cpu", dtype))
    try:
        with torch.enable_grad():
            fwd.run()
            for n in fwd.assigned:  # each name's value after the line that last wrote it
                t = fwd.scope[n]
                if n == loss:  # its gradient is 1, no learner's to check
                    continue
                if isinstance(t, Traced) and t.t.requires_grad and not t.t.is_leaf:
                    t.t.retain_grad()
            result = fwd.scope[loss].t
            if not result.requires_grad:
                raise ForwardFailed(f"{loss} depends on no tensor with a gradient")
            result.backward()
    except ProgramError as err:
        raise ForwardFailed(f"line {err.line} of the forward: {err}") from None
    except (IndexError, RuntimeError, ValueError, TypeError) as err:
        raise ForwardFailed(f"the forward could not run: {_first_line(err)}") from None
    made = {}
    for n in fwd.assigned:
        namespace[n] = _plain(fwd.scope[n])
        made[n] = id(namespace[n])
    return Forward(
        program=program,
        lines=dry.executed,
        reads=_reads(program),
        inputs=list(inputs),
        grad_inputs=grad_inputs,
        assigned=list(fwd.assigned),
        loss_name=loss,
        loss=float(result.detach()),
        made=made,
    )
