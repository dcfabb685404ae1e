"""Losses: the start of the backward pass, so their backward takes no upstream gradient."""

from __future__ import annotations

import math

from app.ops.base import Op, Traced


class MSE(Op):
    """loss = mean((out - target)^2); out (*B, 1) is squeezed to target's (*B,) as in the article."""

    kind = "mse"
    no_grad_inputs = frozenset({1})  # the target

    @staticmethod
    def _squeezes(out: Traced, target: Traced) -> bool:
        return out.ndim == target.ndim + 1 and out.shape[-1] == 1

    def forward(self, out: Traced, target: Traced) -> Traced:
        diff = out.squeeze(-1) - target if self._squeezes(out, target) else out - target
        return diff.pow(2).mean()

    def backward(self, g: Traced | None, out: Traced, target: Traced, *, result: Traced):
        n = math.prod(target.shape)  # the mean's count
        if self._squeezes(out, target):
            # (*B, 1) -> (*B,), minus target (*B,), then back to (*B, 1)
            return {out.expr: lambda: 2 * (out.squeeze(-1) - target).unsqueeze(-1) / n}
        return {out.expr: lambda: 2 * (out - target) / n}
