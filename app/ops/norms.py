"""Normalizations: mean and variance with keepdim, then a broadcast `* gamma + beta`.

layernorm takes its statistics over the last dim (one pair per row), batchnorm over every
leading dim (one pair per feature, batch statistics, biased variance, as
`F.batch_norm` in training mode). Everything else, the backward included, is shared: the
two differ only in the dims they reduce.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from app.ops.base import Op, Trail, sum_formula
from app.ops.functional import unbroadcast
from app.ops.traced import Traced

EPS = 1e-5


class _Norm(Op):
    """n = (l - mean) / sqrt(var + eps) * gamma + beta: l (*B, h), gamma and beta (h,)."""

    def dims(self, l: Traced) -> int | tuple[int, ...]:  # noqa: E741
        raise NotImplementedError

    def _count(self, l: Traced) -> int:  # noqa: E741
        """How many values each mean averages over."""
        dims = self.dims(l)
        return math.prod(l.shape[d] for d in ((dims,) if isinstance(dims, int) else dims))

    def _normalize(self, l: Traced) -> dict[str, Traced]:  # noqa: E741
        """The forward's named intermediates; stats have 1s where the dims were reduced."""
        dims = self.dims(l)
        mu = l.mean(dims, keepdim=True).named("mu")  # the mean, kept as a broadcastable stat
        xc = (l - mu).named("xc")  # (*B, h) - stat: broadcast over the reduced dims
        var = xc.pow(2).mean(dims, keepdim=True).named("var")  # biased variance
        rstd = (var + EPS).rsqrt().named("rstd")  # 1 / sqrt(var + eps)
        xhat = (xc * rstd).named("xhat")  # (*B, h) * stat: broadcast again
        return dict(mu=mu, xc=xc, var=var, rstd=rstd, xhat=xhat)

    def forward(self, l: Traced, gamma: Traced, beta: Traced) -> Traced:  # noqa: E741
        xhat = self._normalize(l)["xhat"]
        return xhat * gamma + beta  # (*B, h) * (h,) + (h,): broadcast over *B

    def backward(self, g: Traced, l: Traced, gamma: Traced, beta: Traced, *, result: Traced):  # noqa: E741
        n = self._count(l)
        s = self._normalize(l)

        def l_grad() -> Traced:
            xhat_g = (g * gamma).named(
                "xhat.g", grad_of=s["xhat"]
            )  # (*B, h) * (h,): gamma was broadcast over *B
            # xhat = xc * rstd: rstd was broadcast, so its gradient sums back to its shape
            rstd_g = unbroadcast(xhat_g * s["xc"], s["rstd"].shape).named(
                "rstd.g", grad_of=s["rstd"]
            )
            # rstd = (var + eps) ** -1/2: d rstd / d var = -rstd^3 / 2
            var_g = (-0.5 * s["rstd"].pow(3) * rstd_g).named("var.g", grad_of=s["var"])
            # var = mean(xc^2): the mean's gradient broadcasts back, / n; d xc^2 = 2 xc
            xc_g = (xhat_g * s["rstd"] + 2 * s["xc"] * var_g / n).named("xc.g", grad_of=s["xc"])
            # xc = l - mu: mu was broadcast over the reduced dims
            mu_g = unbroadcast(-xc_g, s["mu"].shape).named("mu.g", grad_of=s["mu"])
            # mu = mean(l): its gradient broadcasts back, / n
            return xc_g + mu_g / n  # (*B, h) + stat

        return {
            l.expr: l_grad,
            gamma.expr: lambda: unbroadcast(g * s["xhat"], gamma.shape),  # sum over *B -> (h,)
            beta.expr: lambda: unbroadcast(g, beta.shape),  # sum over *B -> (h,)
        }

    followed = frozenset({1, 2})  # gamma, beta: each sums over *B

    def follow(
        self, name: str, index: tuple[int, ...], g: torch.Tensor, xs: Sequence[torch.Tensor]
    ) -> Trail:
        """gamma.g[j] = sum over *B of g[*n, j] * xhat[*n, j]; beta.g[j] of g[*n, j]. Only
        column j of xhat is made (layernorm's rows still need their own statistics)."""
        l, gamma, _ = xs  # noqa: E741
        (j,) = index
        g_name = f"{self.output}.g"
        every = (None,) * (l.ndim - 1)  # `:` over *B
        at = {g_name: (*every, j)}
        factors = {g_name: g[..., j].reshape(-1)}  # (N,)
        if name == self.inputs[1]:
            at["xhat"] = (*every, j)
            factors["xhat"] = self.xhat_column(l, j)  # (N,)
        return Trail(sum_formula(name, index, at), tuple(g.shape), (*every, j), factors, at)

    def xhat_column(self, l: torch.Tensor, j: int) -> torch.Tensor:  # noqa: E741
        """xhat[..., j] flattened to (N,), as `_normalize` makes it."""
        raise NotImplementedError


class LayerNorm(_Norm):
    """Statistics over the last dim: mu, var (*B, 1); n (*B, h)."""

    kind = "layernorm"

    def dims(self, l: Traced) -> int:  # noqa: E741
        return -1

    def xhat_column(self, l: torch.Tensor, j: int) -> torch.Tensor:  # noqa: E741
        rows = l.reshape(-1, l.shape[-1])  # (N, h): each row has its own statistics
        var, mu = torch.var_mean(rows, -1, correction=0)  # (N,), (N,)
        return (rows[:, j] - mu) * (var + EPS).rsqrt()


class BatchNorm(_Norm):
    """Statistics over every leading dim: mu, var (1, ..., 1, h); n (*B, h)."""

    kind = "batchnorm"

    def dims(self, l: Traced) -> int | tuple[int, ...]:  # noqa: E741
        lead = tuple(range(l.ndim - 1))
        return lead[0] if len(lead) == 1 else lead

    def xhat_column(self, l: torch.Tensor, j: int) -> torch.Tensor:  # noqa: E741
        col = l[..., j].reshape(-1)  # (N,): column j has its own statistics
        mu = col.mean()
        xc = col - mu
        return xc * (xc.pow(2).mean() + EPS).rsqrt()
