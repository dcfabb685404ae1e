"""The finite-difference spot check: float64 central differences at sampled entries of every
gradient, a second witness beside autograd. It shares no code with the manual side (app/ops);
with autograd it shares the reference forward (app/check/reference.py) and the check's rounding
rules (app/check/autograd.py), not the differentiation: it evaluates losses, never a backward.

The reference network (app/check/reference.py, the autograd check's too) runs here in float64 on
(rows, features) views, from the stage a perturbed entry first reaches (`forward_from`), so
that it re-runs only the layers after it (see `_FDNet`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from app.check import reference
from app.check.autograd import cancelling_scale
from app.check.tolerance import NOISE_FACTOR

FD_REL_STEP = 1e-6  # h = 1e-6 * max(1, |entry|): near the float64 optimum for central differences
# A yardstick, not a limit: about 2 s of float64 work. What is refused is a whole run over the
# work limit (app/cost/work.py counts fd_cost_flops in it; the 422 names fd_samples when dropping
# them would fit); a test holds the article's run with the most samples under this.
FD_MAX_FLOPS = 4e9
FD_SEED_OFFSET = 0x5EED  # the samples' own generator: seed + this, apart from the run's tensors
FD_RTOL = {torch.float32: 1e-3, torch.float64: 1e-4}  # plus the differences' own rounding
FD_EPS = 8 * torch.finfo(torch.float64).eps  # per loss evaluation, with a margin
FD_CANDIDATES = 4  # entries drawn per requested sample, so kinks can be skipped


class _FDNet:
    """The contract's network in float64 on (rows, features) views, run from any stage.

    A sample perturbs one entry; by linearity its effect on the first stage it reaches is
    exact and cheap (`w{k}[i, j]` adds h * a[:, i] to column j of l{k}), so each of the two
    passes runs only the layers after it, and for x (without batchnorm) only its own row.
    """

    def __init__(self, cfg, tensors: Mapping[str, torch.Tensor]):
        self.cfg = cfg
        self.L = len(cfg.hidden) + 1
        self.norm = cfg.norm
        self.kinked = cfg.activation in ("relu", "leaky_relu")
        p = {n: t.detach().to(torch.float64) for n, t in tensors.items() if n != "target"}
        p["x"] = p["x"].reshape(-1, cfg.in_features)
        target = tensors["target"]
        if cfg.loss == "cross_entropy":
            self.target = target.reshape(-1)
            self.count = self.target.numel()
        else:
            self.target = target.detach().to(torch.float64).reshape(p["x"].shape[0], -1)
            self.count = target.numel()
        self.p = p
        # the unperturbed pass, per stage: l{k} (out as l{L}), n{k} (with a norm), a{k}
        stages: dict[str, torch.Tensor] = {}
        reference.forward(cfg, {**p, "target": self.target}, stages)
        self.a = {0: p["x"], **{k: stages[f"a{k}"] for k in range(1, self.L)}}
        self.l = {**{k: stages[f"l{k}"] for k in range(1, self.L)}, self.L: stages["out"]}
        self.n = {k: stages[f"n{k}"] for k in range(1, self.L) if self.norm != "none"}
        self.xhat = {}  # l{k} normalized without gamma, beta: what gamma{k}[j] scales
        for k in self.n:
            ones, zeros = torch.ones_like(p[f"b{k}"]), torch.zeros_like(p[f"b{k}"])
            self.xhat[k] = reference.normalize(self.norm, self.l[k], ones, zeros)

    def tail(
        self, k: int, z: torch.Tensor, normed: bool, rows: slice
    ) -> tuple[float, list[torch.Tensor]]:
        """Loss summed over `rows` / the loss's count, from layer k's `z` (l{k}, or its
        normalized value when `normed`), and the sign masks of every kinked pre-activation."""
        stages: dict[str, torch.Tensor] = {}
        leaves = {**self.p, "target": self.target[rows]}
        total = reference.forward_from(self.cfg, leaves, k, z, stages, normed, reduction="sum")
        masks = []
        if self.kinked:  # the activation's input: n{j} with a norm, l{j} without
            kind = "l" if self.norm == "none" else "n"
            masks = [stages[f"{kind}{j}"] > 0 for j in range(k, self.L)]
        return total.item() / self.count, masks

    def perturbed(self, name: str, index: int, h: float):
        """How one entry's +-h reaches its first stage: (k, add(z, sign), normed, rows)."""
        kind, k = _split_name(name)
        every = slice(None)
        if kind == "x":
            r, i = divmod(index, self.p["x"].shape[1])
            w = self.p["w1"][i]  # (h1,): x[r, i] moves row r of l1 by h * w1[i, :]
            if self.norm == "batchnorm":  # rows are coupled through the batch statistics
                return (
                    1,
                    lambda z, s: z.index_add(0, torch.tensor([r]), s * h * w[None]),
                    False,
                    every,
                )
            return 1, lambda z, s: z[r : r + 1] + s * h * w, False, slice(r, r + 1)
        if kind == "w":  # w[i, j] moves column j of l{k} by h * a{k-1}[:, i]
            i, j = divmod(index, self.p[name].shape[1])
            col = self.a[k - 1][:, i : i + 1]
            return k, lambda z, s: z.index_add(1, torch.tensor([j]), s * h * col), False, every
        # b[j], beta[j] move column j by h (of l{k}, of n{k}); gamma[j] by h * xhat[:, j]
        col = (
            self.xhat[k][:, index : index + 1]
            if kind == "gamma"
            else torch.ones_like(self.l[k][:, :1])
        )
        return (
            k,
            lambda z, s: z.index_add(1, torch.tensor([index]), s * h * col),
            kind != "b",
            every,
        )

    def difference(self, name: str, index: int) -> tuple[float, float] | None:
        """The central difference at one entry and the error it carries; None when a kink
        lies within reach. The error is the larger of float64's rounding on the two losses
        over 2h and twice the disagreement with the step 2h: central differences err ~ h**2,
        so the two steps differ by ~3x the truncation, and rounding amplified by cancellation
        inside the forward (a batchnorm over 2 rows) makes them disagree by about as much as
        it moves the smaller step."""
        value = self.p[name].reshape(-1)[index].item()
        h = FD_REL_STEP * max(1.0, abs(value))
        small, large = self._central(name, index, h), self._central(name, index, 2 * h)
        if small is None or large is None:
            return None
        (fd, rounding), (fd_wide, _) = small, large
        return fd, max(rounding, 2 * abs(fd_wide - fd))

    def _central(self, name: str, index: int, h: float) -> tuple[float, float] | None:
        k, add, normed, rows = self.perturbed(name, index, h)
        base = self.n[k] if normed else self.l[k]
        plus, plus_masks = self.tail(k, add(base, 1), normed, rows)
        minus, minus_masks = self.tail(k, add(base, -1), normed, rows)
        if any(not torch.equal(p, m) for p, m in zip(plus_masks, minus_masks)):
            return None
        rounding = FD_EPS * (abs(plus) + abs(minus)) / (2 * h)
        return (plus - minus) / (2 * h), rounding


def _split_name(name: str) -> tuple[str, int]:
    """`"gamma2"` -> `("gamma", 2)`; `"x"` -> `("x", 1)` (x enters layer 1)."""
    kind = name.rstrip("0123456789")
    return kind, int(name[len(kind) :] or 1)


def _fd_layout(cfg) -> tuple[int, list[tuple[str, int, int]]]:
    """(rows, [(gradient name, numel, first layer its perturbation reaches)])."""
    from app.engine.tensors import input_specs

    specs = [s for s in input_specs(cfg) if s.role != "target"]
    rows = math.prod(specs[0].shape[:-1])
    return rows, [(s.name, math.prod(s.shape), _split_name(s.name)[1]) for s in specs]


def fd_cost_flops(cfg) -> float:
    """About how much float64 work `finite_difference_check` does: four passes per sample,
    each over the layers after the one the sample perturbs (x without batchnorm: one row)."""
    if not cfg.fd_samples:
        return 0.0
    widths = [cfg.in_features, *cfg.hidden, cfg.out_features]
    rows, layout = _fd_layout(cfg)
    total = 0.0
    for name, numel, k in layout:
        r = 1 if name == "x" and cfg.norm != "batchnorm" else rows
        after = sum(widths[j - 1] * widths[j] for j in range(k + 1, len(widths)))
        per_pass = r * (2 * after + 16 * sum(widths[k:]))  # matmuls + elementwise, norms, loss
        total += min(cfg.fd_samples, numel) * 4 * per_pass  # steps h and 2h, each +-
    return total


def finite_difference_check(
    cfg,
    tensors: Mapping[str, torch.Tensor],
    manual: Mapping[str, torch.Tensor],
    rounding_noise: Mapping[str, float] | None = None,
    check: Callable[[], None] | None = None,
) -> dict[str, dict[str, float | int | None]]:
    """Float64 central differences at `cfg.fd_samples` entries of every gradient.

    Entries are drawn by a generator seeded from the run's seed (+ FD_SEED_OFFSET). With
    relu/leaky_relu, an entry whose +-h passes change any pre-activation's sign (a kink
    within reach) is skipped for the next candidate, so `samples` may come out smaller.
    max_abs_err is over the samples; max_rel_err divides it by the gradient's scale: the
    larger of max|manual gradient| over the whole tensor and max|difference| over the samples
    (so an all-zero or shrunken manual gradient shows an error near 1), or for a gradient
    that cancels to ~0 by the scale of the terms it sums (`cancelling_scale`). `allclose`:
    max_abs_err <= FD_RTOL * scale, plus the differences' own error (`difference`), plus the
    run's resolution (4 eps of its dtype times the largest gradient of any leaf), plus
    NOISE_FACTOR times the gradient's `rounding_noise` where the autograd check measured it.
    """
    net = _FDNet(cfg, tensors)
    # below eps * the network's largest gradient, a gradient is under the run's resolution
    # (a saturated tanh is exactly 1 in float32, its gradient exactly 0)
    leaves = [manual[name] for name, _, _ in _fd_layout(cfg)[1]]
    resolution = (
        NOISE_FACTOR * torch.finfo(leaves[0].dtype).eps * max(g.abs().max().item() for g in leaves)
    )
    gen = torch.Generator().manual_seed((cfg.seed + FD_SEED_OFFSET) % 2**63)
    _, layout = _fd_layout(cfg)
    report: dict[str, dict[str, float | int | None]] = {}
    for name, numel, _ in layout:
        want = min(cfg.fd_samples, numel)
        if numel <= FD_CANDIDATES * want:
            candidates = torch.randperm(numel, generator=gen).tolist()
        else:
            drawn = torch.randint(numel, (FD_CANDIDATES * want,), generator=gen).tolist()
            candidates = list(dict.fromkeys(drawn))
        grad = manual[name].detach().reshape(-1)
        errors, sampled, own = [], [], 0.0
        for index in candidates:
            if len(errors) == want:
                break
            if check is not None:
                check()  # raises when the run is to stop
            found = net.difference(name, index)
            if found is not None:
                fd, rounding = found
                errors.append(abs(grad[index].item() - fd))
                sampled.append(abs(fd))
                own = max(own, rounding)
        max_abs = max(errors, default=0.0)
        scale = max(
            grad.abs().max().item(), max(sampled, default=0.0), cancelling_scale(cfg, name, manual)
        )
        rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else None)
        rtol = FD_RTOL[grad.dtype]
        report[name] = {
            "samples": len(errors),
            "max_abs_err": max_abs,
            "max_rel_err": rel,
            "allclose": math.isfinite(max_abs)
            and max_abs
            <= rtol * scale
            + own
            + resolution
            + NOISE_FACTOR * (rounding_noise or {}).get(name, 0.0),
            "rtol": rtol,
        }
    return report
