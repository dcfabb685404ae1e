"""Losses: the start of the backward pass, so their backward takes no upstream gradient."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from app.ops.base import Context, Op, variant
from app.ops.functional import one_hot, unbroadcast
from app.ops.traced import Traced


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


class CrossEntropy(Op):
    """loss = mean over *B of -log_softmax(out)[target]: out (*B, C), target (*B,) int64 -> ().

    The forward is the numerically stable log-softmax, each step named. The backward walks
    those steps in reverse (makemore's "backprop ninja"), every broadcast undone by
    `unbroadcast`; the fused form `(probs - one_hot) / N` is a second, checked formula.
    """

    kind = "cross_entropy"
    no_grad_inputs = frozenset({1})  # the target

    @staticmethod
    def _softmax_steps(out: Traced) -> dict[str, Traced]:
        """The forward's named intermediates, each (*B, C) or (*B, 1)."""
        m = out.amax(-1, keepdim=True).named("m")  # (*B, 1): each row's max
        shifted = (out - m).named("shifted")  # (*B, C) - (*B, 1): broadcast over C
        counts = shifted.exp().named("counts")  # (*B, C), each in (0, 1]
        counts_sum = counts.sum(-1, keepdim=True).named("counts_sum")  # (*B, 1)
        logprobs = (shifted - counts_sum.log()).named("logprobs")  # (*B, C) - (*B, 1)
        return dict(m=m, shifted=shifted, counts=counts, counts_sum=counts_sum, logprobs=logprobs)

    @staticmethod
    def _one_hot(target: Traced, like: Traced) -> Traced:
        """(*B,) class indices -> (*B, C) 0./1. rows, in `like`'s dtype."""
        return one_hot(target, like.shape[-1]).to_dtype_of(like)

    def forward(self, out: Traced, target: Traced) -> Traced:
        logprobs = self._softmax_steps(out)["logprobs"]
        picked = logprobs.gather(-1, target.unsqueeze(-1))  # (*B, 1): log p of each target
        return -picked.mean()

    def backward(self, g: Traced | None, out: Traced, target: Traced, *, result: Traced):
        n = math.prod(target.shape)  # the mean's count: every leading position

        def step_by_step() -> Traced:
            s = self._softmax_steps(out)
            # mean then gather, undone: -1/n scattered to each row's target column
            logprobs_g = (-self._one_hot(target, out) / n).named(
                "logprobs.g", grad_of=s["logprobs"]
            )  # (*B, C)
            # logprobs = shifted - counts_sum.log(): counts_sum.log() (*B, 1) was broadcast
            # over C, so its gradient sums back over C; d log(u) = 1 / u
            counts_sum_g = (
                unbroadcast(-logprobs_g, s["counts_sum"].shape) / s["counts_sum"]
            ).named("counts_sum.g", grad_of=s["counts_sum"])  # (*B, 1)
            # counts_sum = counts.sum(-1): its gradient broadcasts back over C; d exp = exp
            shifted_g = (logprobs_g + s["counts"] * counts_sum_g).named(
                "shifted.g", grad_of=s["shifted"]
            )  # (*B, C)
            # shifted = out - m: m (*B, 1) was broadcast over C (its gradient is ~0: softmax
            # does not change when a row is shifted)
            m_g = unbroadcast(-shifted_g, s["m"].shape).named("m.g", grad_of=s["m"])  # (*B, 1)
            # m = out.max(-1): the gradient goes to where each row's max is
            return shifted_g + out.eq(s["m"]).to_dtype_of(out) * m_g  # (*B, C)

        def fused() -> Traced:
            s = self._softmax_steps(out)
            probs = (s["counts"] / s["counts_sum"]).named("probs")  # softmax: (*B, C) / (*B, 1)
            return (probs - self._one_hot(target, out)) / n  # (*B, C)

        return {out.expr: step_by_step, variant(out.expr, "fused"): fused}

    def compute_forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """`forward` op for op on plain tensors (the same numbers, no Traced bookkeeping)."""
        out, target = xs
        shifted = out - out.amax(-1, keepdim=True)  # (*B, C)
        logprobs = shifted - shifted.exp().sum(-1, keepdim=True).log()  # (*B, C)
        return -logprobs.gather(-1, target.unsqueeze(-1)).mean()

    def compute_backward(
        self, g: torch.Tensor | None, xs: Sequence[torch.Tensor], result: torch.Tensor, ctx: Context
    ) -> dict[str, torch.Tensor]:
        """The same formulas as `backward`, op for op (so the same numbers), on plain tensors:
        the Traced bookkeeping of their ~20 small ops took half a training step."""
        out, target = xs
        name = self.inputs[0]
        n = math.prod(target.shape)
        m = out.amax(-1, keepdim=True)  # (*B, 1)
        shifted = out - m  # (*B, C)
        counts = shifted.exp()  # (*B, C)
        counts_sum = counts.sum(-1, keepdim=True)  # (*B, 1)
        one_hot = F.one_hot(target, out.shape[-1]).to(out.dtype)  # (*B, C)
        grads = {}
        if ctx.wants(name):
            logprobs_g = -one_hot / n  # (*B, C)
            counts_sum_g = (-logprobs_g).sum(-1, keepdim=True) / counts_sum  # (*B, 1)
            shifted_g = logprobs_g + counts * counts_sum_g  # (*B, C)
            m_g = (-shifted_g).sum(-1, keepdim=True)  # (*B, 1)
            grads[name] = shifted_g + out.eq(m).to(out.dtype) * m_g  # (*B, C)
        fused_key = variant(name, "fused")
        if ctx.wants(fused_key):
            grads[fused_key] = (counts / counts_sum - one_hot) / n  # (*B, C)
        return grads
