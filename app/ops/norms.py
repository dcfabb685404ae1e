"""Normalizations: mean and variance with keepdim, then a broadcast `* gamma + beta`.

layernorm takes its statistics over the last dim (one pair per row), batchnorm over every
leading dim (one pair per feature, batch statistics, biased variance, as
`F.batch_norm` in training mode). Everything else, the backward included, is shared: the
two differ only in the dims they reduce.
"""

from __future__ import annotations

import math

from app.ops.base import Op, Traced, unbroadcast

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


class LayerNorm(_Norm):
    """Statistics over the last dim: mu, var (*B, 1); n (*B, h)."""

    kind = "layernorm"

    def dims(self, l: Traced) -> int:  # noqa: E741
        return -1


class BatchNorm(_Norm):
    """Statistics over every leading dim: mu, var (1, ..., 1, h); n (*B, h)."""

    kind = "batchnorm"

    def dims(self, l: Traced) -> int | tuple[int, ...]:  # noqa: E741
        lead = tuple(range(l.ndim - 1))
        return lead[0] if len(lead) == 1 else lead
