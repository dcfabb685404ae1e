"""The network as a list of ops built from a config: forward, manual backward, and the trace.

Data flows one way: tensors -> forward (every op's output kept by name) -> backward (the ops
in reverse, each turning its output's gradient into its inputs' gradients).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from app.ops import Context, Op, Traced
from app.ops.base import split_variant


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
                args = [Traced.leaf(env[n], n) for n in op.inputs]
                env[op.output] = op.forward(*args).t
        return env

    def backward(self, env: Mapping[str, torch.Tensor], ctx: Context) -> dict[str, torch.Tensor]:
        """The manual backward pass: each op's gradients, the ops walked in reverse."""
        grads: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for op in reversed(self.ops):
                ctx.check()
                g = grads.get(op.output)  # None for the loss: d loss / d loss = 1
                xs = [env[n] for n in op.inputs]
                for name, grad in op.compute_backward(g, xs, env[op.output], ctx).items():
                    grads[name] = grads[name] + grad if name in grads else grad
        return grads

    def trace(
        self, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The forward and backward traces, from shape arithmetic on meta tensors alone."""
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
            formulas = op.backward(g, *(env[n] for n in op.inputs), result=env[op.output])
            for key, formula in formulas.items():
                grad = formula()
                name, label = split_variant(key)
                entry = {
                    "op": op.kind,
                    "grad": name,
                    "code": grad.code(f"{name}.g"),
                    "steps": [s.as_dict() for s in grad.steps],
                    "shape": list(grad.shape),
                }
                if label is not None:  # another formula for the same gradient, not propagated
                    entry["variant"] = label
                backward.append(entry)
                if label is None:
                    grads[name] = Traced.leaf(grad.t, f"{name}.g")
        return forward, backward
