"""The network as a list of ops built from a config: forward, manual backward, and the trace.

Data flows one way: tensors -> forward (every op's output kept by name) -> backward (the ops
in reverse, each turning its output's gradient into its inputs' gradients).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from app.lab.allowlist import FormulaError
from app.lab.formulas import LearnerFormula, formula_cost
from app.ops import Context, Op, Traced
from app.ops.base import split_variant


def _no_pace() -> None:
    return None


# Called between two learner formulas, in a dry run (`Network.trace`) and in a run
# (`Network.backward`): the server sets it to stop a dry run at its deadline and to step aside
# while a run is in flight (app.server.lanes.RunLimiter.pacer), and a run of long formulas to
# step aside while a light run is in flight (app.api.run). Nothing by default.
PACE: ContextVar[Callable[[], None]] = ContextVar("pace", default=_no_pace)


@dataclass
class Network:
    ops: list[Op]

    @classmethod
    def from_config(cls, cfg) -> Network:
        """linear -> [norm] -> activation for each hidden layer, then linear, then the loss."""
        n_layers = len(cfg.hidden) + 1
        ops: list[Op] = []
        a = "x"
        for k in range(1, n_layers + 1):
            last = k == n_layers
            z = "out" if last else f"l{k}"
            ops.append(Op.registry["linear"]([a, f"w{k}", f"b{k}"], z))
            if last:
                break
            if cfg.norm != "none":
                ops.append(Op.registry[cfg.norm]([z, f"gamma{k}", f"beta{k}"], f"n{k}"))
                z = f"n{k}"
            a = f"a{k}"
            ops.append(Op.registry[cfg.activation]([z], a))
        ops.append(Op.registry[cfg.loss](["out", "target"], "loss"))
        return cls(ops)

    @property
    def outputs(self) -> list[str]:
        return [op.output for op in self.ops]

    def forward(
        self, tensors: Mapping[str, torch.Tensor], ctx: Context | None = None
    ) -> dict[str, torch.Tensor]:
        """Every op's output by name, the inputs included; no autograd involved. With `ctx`,
        its cancel token is checked before each op."""
        env = dict(tensors)
        with torch.no_grad():
            for op in self.ops:
                if ctx is not None:
                    ctx.check()
                env[op.output] = op.compute_forward([env[n] for n in op.inputs])
        return env

    @property
    def grad_order(self) -> list[str]:
        """Every gradient the backward pass computes, in the order it computes them."""
        return [name for op in reversed(self.ops) for name in op.grad_inputs]

    def backward(
        self,
        env: Mapping[str, torch.Tensor],
        ctx: Context,
        formulas: Mapping[str, LearnerFormula] | None = None,
        builtin: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The manual backward pass: each op's gradients, the ops walked in reverse.

        A learner's formula (by gradient name) replaces the op's own gradient, so every
        gradient computed after it is computed from it. With `builtin` (a dict to fill), the
        gradients the built-in formulas alone give go there too: an op whose output gradient
        is still the built-in one shares its results, so only the ops upstream of a learner's
        formula for an intermediate run twice."""
        formulas = formulas or {}
        grads: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for op in reversed(self.ops):
                ctx.check()
                g = grads.get(op.output)  # None for the loss: d loss / d loss = 1
                xs = [env[n] for n in op.inputs]
                made = op.compute_backward(g, xs, env[op.output], ctx)
                if builtin is not None:
                    own = builtin.get(op.output)
                    same = own is g  # the built-in chain has not diverged here
                    own_made = made if same else op.compute_backward(own, xs, env[op.output], ctx)
                    _accumulate(builtin, own_made)
                _accumulate(grads, made)
                for name in op.grad_inputs:
                    if name in formulas:
                        PACE.get()()  # a run of long formulas may step aside here
                        grads[name] = formulas[name].compute(env, grads)
        return grads

    def trace(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        dtypes: Mapping[str, torch.dtype],
        formulas: Mapping[str, LearnerFormula] | None = None,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The forward and backward traces, from shape arithmetic on meta tensors alone.

        With the learner's `formulas`, this is their dry run: each is traced where its
        gradient is computed, in place of the op's own (`"source": "user"`), and raises
        FormulaError (with `.key`) if it cannot run."""
        formulas = formulas or {}
        env = {
            n: Traced.leaf(torch.empty(s, dtype=dtypes[n], device="meta"), n)
            for n, s in shapes.items()
        }
        forward = []
        for op in self.ops:
            out = op.forward(*(env[n] for n in op.inputs))
            forward.append(
                {
                    "op": op.kind,
                    "code": out.code(op.output),
                    "inputs": list(op.inputs),
                    "output": op.output,
                    "shape": list(out.shape),
                    "steps": [s.as_dict() for s in out.steps],
                }
            )
            env[op.output] = Traced.leaf(out.t, op.output)
        backward = []
        grads: dict[str, Traced] = {}
        for op in reversed(self.ops):
            g = grads.get(op.output)
            ins = [env[n] for n in op.inputs]
            for key, formula in op.backward(g, *ins, result=env[op.output]).items():
                grad = formula()
                name, label = split_variant(key)
                entry = _trace_entry(op.kind, name, grad, "reference")
                if label is not None:  # another formula for the same gradient, not propagated
                    entry["variant"] = label
                elif name in formulas:
                    PACE.get()()  # a dry run may stop, or wait for a run, here
                    learner = _learner_entry(op.kind, formulas[name], env, grads, grad)
                    learner["reference_code"] = entry["code"]
                    entry, grad = learner, learner.pop("traced")
                backward.append(entry)
                if label is None:
                    grads[name] = Traced.leaf(grad.t, f"{name}.g")
        return forward, backward


def _accumulate(grads: dict[str, torch.Tensor], made: Mapping[str, torch.Tensor]) -> None:
    """Add an op's gradients in (a name another op already sent a gradient to sums them)."""
    for name, grad in made.items():
        grads[name] = grads[name] + grad if name in grads else grad


def _trace_entry(kind: str, name: str, grad: Traced, source: str) -> dict[str, Any]:
    return {
        "op": kind,
        "grad": name,
        "code": grad.code(f"{name}.g"),
        "steps": [s.as_dict() for s in grad.steps],
        "shape": list(grad.shape),
        "source": source,
    }


def _learner_entry(
    kind: str,
    learner: LearnerFormula,
    env: Mapping[str, Traced],
    grads: Mapping[str, Traced],
    reference: Traced,
) -> dict[str, Any]:
    """The learner's formula traced on meta tensors, in the built-in formula's place."""
    try:
        grad = learner.evaluate(env, grads, reference.shape)
    except FormulaError as err:
        err.key = learner.formula.key
        raise
    held, work, flops = formula_cost([s.as_dict() for s in grad.steps])
    entry = _trace_entry(kind, learner.grad, grad, "user")
    return {**entry, "bytes": held, "work": work, "flops": flops, "traced": grad}
