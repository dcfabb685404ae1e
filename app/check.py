"""The check: every manual gradient against torch.autograd on fresh leaves.

The reference forward pass is written independently of app.ops, with torch.nn.functional,
so a mistake in an op's forward cannot hide the same mistake in its check.

Tolerances (per dtype): an element passes when |manual - autograd| <= atol + rtol * |autograd|
with atol = atol_scale * max|autograd|. The absolute part scales with the gradient, so tiny
entries next to large ones do not fail on rounding alone, while an all-zero (or otherwise
wrong) manual gradient still fails on the large entries. Both are reported per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from app.ops.activations import LEAKY_SLOPE
from app.ops.base import split_variant

NORM_EPS = 1e-5
# rtol, atol_scale. float32 sums over a batch round at ~1e-7 relative; 1e-4/1e-5 leaves a wide
# margin for deep nets while any real error in a formula is orders of magnitude larger.
TOLERANCES = {
    torch.float32: (1e-4, 1e-5),
    torch.float64: (1e-9, 1e-12),
}


def reference_loss(
    cfg, leaves: Mapping[str, torch.Tensor], keep: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """The loss, computed with torch's own ops so autograd can differentiate it.

    With `keep`, the pre-norm linear outputs `l{k}` and `out` are stored there with
    `retain_grad()`, so their gradients can be checked too."""
    n_layers = len(cfg.hidden) + 1
    a = leaves["x"]
    for k in range(1, n_layers + 1):
        z = torch.matmul(a, leaves[f"w{k}"]) + leaves[f"b{k}"]
        if keep is not None and z.requires_grad:
            z.retain_grad()
            keep["out" if k == n_layers else f"l{k}"] = z
        if k == n_layers:
            out = z
            break
        if cfg.norm == "layernorm":
            z = F.layer_norm(z, z.shape[-1:], leaves[f"gamma{k}"], leaves[f"beta{k}"], NORM_EPS)
        elif cfg.norm == "batchnorm":  # batch statistics over every leading dim
            flat = z.reshape(-1, z.shape[-1])
            flat = F.batch_norm(
                flat, None, None, leaves[f"gamma{k}"], leaves[f"beta{k}"], True, 0.0, NORM_EPS
            )
            z = flat.reshape(z.shape)
        a = activation_reference(cfg.activation, z)
    target = leaves["target"]
    if cfg.loss == "mse":
        if cfg.out_features == 1:
            return F.mse_loss(out.squeeze(-1), target)
        return F.mse_loss(out, target)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


def activation_reference(name: str, z: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return torch.relu(z)  # gradient 0 at exactly 0, as (z > 0); clamp_min would give 1
    if name == "leaky_relu":
        return F.leaky_relu(z, LEAKY_SLOPE)
    if name == "tanh":
        return torch.tanh(z)
    if name == "sigmoid":
        return torch.sigmoid(z)
    raise ValueError(f"unknown activation {name!r}")


def autograd_gradients(
    cfg,
    tensors: Mapping[str, torch.Tensor],
    intermediates: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """d loss / d every float input, by loss.backward() on fresh leaves.

    `detach()` makes new leaves that share storage with the run's tensors: nothing is copied.
    With `intermediates`, d loss / d `out` and each pre-norm `l{k}` are put there too.
    """
    leaves = {
        n: t.detach().requires_grad_(t.is_floating_point()) if n != "target" else t
        for n, t in tensors.items()
    }
    keep: dict[str, torch.Tensor] | None = {} if intermediates is not None else None
    with torch.enable_grad():
        reference_loss(cfg, leaves, keep).backward()
    if intermediates is not None and keep:
        intermediates.update({n: t.grad for n, t in keep.items()})
    return {n: t.grad for n, t in leaves.items() if n != "target"}


def compare(
    manual: torch.Tensor,
    reference: torch.Tensor,
    atol_floor: float = 0.0,
    rounding_noise: float = 0.0,
) -> dict[str, float | bool | None]:
    """max abs error, max relative error (to max|reference|), allclose and exact.

    One pass each over |diff| and |reference|. NaN compares false, so a non-finite entry on
    either side fails allclose (inf - inf is NaN too). `atol_floor` raises the scale of atol
    for a gradient that cancels to ~0 (see `cancelling_scale`); `rounding_noise` is
    the rounding error both sides carry (see `recheck_rounding`).
    """
    rtol, atol_scale = TOLERANCES[reference.dtype]
    if reference.numel() == 0:
        return dict(
            max_abs_err=0.0, max_rel_err=0.0, allclose=True, exact=True, rtol=rtol, atol=0.0
        )
    diff = (manual - reference).abs()
    ref_abs = reference.abs()
    scale = ref_abs.max().item()
    max_abs = diff.max().item()
    if scale > 0:
        max_rel = max_abs / scale
    else:
        max_rel = 0.0 if max_abs == 0 else float("inf")
    # never stricter than the rounding both sides carry, where that is known (recheck_rounding)
    atol = max(atol_scale * max(scale, atol_floor), NOISE_FACTOR * rounding_noise)
    allclose = bool((diff <= ref_abs.mul_(rtol).add_(atol)).all())
    return {
        "max_abs_err": max_abs,
        "max_rel_err": max_rel,
        "allclose": allclose,
        "exact": max_abs == 0,
        "rtol": rtol,
        "atol": atol,
    }


def cancelling_scale(cfg, name: str, intermediates: Mapping[str, torch.Tensor]) -> float:
    """The scale of the terms a gradient sums, where the sum itself cancels to ~0.

    Before a batchnorm, `b{k}.g = l{k}.g.sum(over *B)` is exactly 0 in exact arithmetic (the
    norm removes any shift), so both sides are rounding noise and max|autograd| is no scale
    for atol. The noise is bounded by eps * sum|terms|, so atol scales with that instead;
    max_rel_err still divides by max|autograd|, as the contract says.
    """
    if cfg.norm != "batchnorm" or not name.startswith("b") or not name[1:].isdigit():
        return 0.0
    terms = intermediates.get(f"l{name[1:]}")
    if terms is None:
        return 0.0
    return terms.abs().reshape(-1, terms.shape[-1]).sum(0).max().item()


def autograd_check(
    cfg, tensors: Mapping[str, torch.Tensor], manual: Mapping[str, torch.Tensor]
) -> dict:
    """Every leaf's manual gradient against autograd (computed here); see `check_against`."""
    inter: dict[str, torch.Tensor] = {}
    reference = autograd_gradients(cfg, tensors, inter)
    return check_against(cfg, manual, reference, inter)


NOISE_FACTOR = 4  # a gradient may differ from autograd by 4x their rounding errors together
RECHECK_MAX_BYTES = 2 << 20  # runs whose inputs and gradients fit in this get the recheck


def recheck_rounding(
    cfg,
    tensors: Mapping[str, torch.Tensor],
    manual: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    inter: Mapping[str, torch.Tensor],
    check: dict,
    manual_at: Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]],
) -> dict:
    """Judge the failures again, knowing how much rounding each side carries.

    Where a gradient cancels to ~0 (a layernorm over 1-2 features, a batchnorm over 2 rows,
    anything upstream of a norm whose output barely depends on it), both sides are rounding
    noise around 0 and max|autograd| is no scale for the tolerance. Running both the manual
    formulas (`manual_at`) and autograd again in the other precision measures how much a
    change of precision moves each side: noise = |autograd - autograd'| + |manual - manual'|.
    A gradient whose disagreement with autograd is within NOISE_FACTOR times that (plus rtol)
    passes, and reports `rounding_noise`. A wrong formula stays wrong: its error does not
    depend on the precision, so it stands far above the noise. (By the triangle inequality
    the noise bounds how far the two sides' roundings alone can pull them apart.) Only failed
    runs whose inputs and gradients fit in RECHECK_MAX_BYTES pay for this (the cancelling
    cases are small ones); only finite gradients are rechecked.
    """
    sections = (check["tensors"], check["intermediates"])
    if all(c["allclose"] for section in sections for c in section.values()):
        return check
    held = [*tensors.values(), *manual.values()]
    if sum(t.numel() * t.element_size() for t in held) > RECHECK_MAX_BYTES:
        return check
    other = torch.float64 if tensors["x"].dtype == torch.float32 else torch.float32
    cast = {n: t.to(other) if t.is_floating_point() else t for n, t in tensors.items()}
    inter_other: dict[str, torch.Tensor] = {}
    reference_other = autograd_gradients(cfg, cast, inter_other)
    manual_other = manual_at(cast)
    for results, ref, ref_other in (
        (check["tensors"], reference, reference_other),
        (check["intermediates"], inter, inter_other),
    ):
        for key, result in results.items():
            name = split_variant(key)[0]
            if result["allclose"] or name not in ref_other or key not in manual_other:
                continue
            pairs = ((ref[name], ref_other[name]), (manual[key], manual_other[key]))
            if not all(torch.isfinite(t).all() for pair in pairs for t in pair):
                continue  # an overflow is no rounding question
            noise = sum((a.double() - b.double()).abs().max().item() for a, b in pairs)
            floor = cancelling_scale(cfg, key, inter) if results is check["tensors"] else 0.0
            result.update(compare(manual[key], ref[name], floor, noise), rounding_noise=noise)
    check["all_close"] = all(c["allclose"] for section in sections for c in section.values())
    return check


def check_against(
    cfg,
    manual: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    inter: Mapping[str, torch.Tensor],
) -> dict:
    """Every leaf's manual gradient against its autograd `reference`, and in `intermediates`
    the gradients of `out` and each pre-norm `l{k}` (`inter`), with every other formula for
    them (e.g. `out:fused`)."""
    per_tensor = {
        name: compare(manual[name], reference[name], cancelling_scale(cfg, name, inter))
        for name in reference
    }
    intermediates = {
        key: compare(manual[key], inter[split_variant(key)[0]])
        for key in manual
        if split_variant(key)[0] in inter
    }
    return {
        "reference": "torch.autograd",
        "all_close": all(c["allclose"] for c in [*per_tensor.values(), *intermediates.values()]),
        "tensors": per_tensor,
        "intermediates": intermediates,
    }


# --------------------------------------------------------------------------- finite differences

FD_REL_STEP = 1e-6  # h = 1e-6 * max(1, |entry|): near the float64 optimum for central differences
FD_MAX_FLOPS = 1e9  # float64 work all the samples may take together (~2 s); more is refused (422)
FD_SEED_OFFSET = 0x5EED  # the samples' own generator: seed + this, apart from the run's tensors
FD_RTOL = {torch.float32: 1e-3, torch.float64: 1e-4}  # plus the differences' own rounding
FD_EPS = 8 * torch.finfo(torch.float64).eps  # per loss evaluation, with a margin
FD_CANDIDATES = 4  # entries drawn per requested sample, so kinks can be skipped


def _fd_norm(norm: str, z: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """z (R, h) normalized as the contract says (rows = every leading position)."""
    dim = -1 if norm == "layernorm" else 0
    xc = z - z.mean(dim, keepdim=True)
    xhat = xc * (xc.pow(2).mean(dim, keepdim=True) + NORM_EPS).rsqrt()
    return xhat * gamma + beta


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
        self.a, self.l, self.xhat = {0: p["x"]}, {}, {}  # the unperturbed pass, per stage
        self.n: dict[int, torch.Tensor] = {}  # normalized l{k}, made when first needed
        for k in range(1, self.L + 1):
            self.l[k] = self.a[k - 1] @ p[f"w{k}"] + p[f"b{k}"]
            if k < self.L:
                if self.norm != "none":
                    ones, zeros = torch.ones_like(p[f"b{k}"]), torch.zeros_like(p[f"b{k}"])
                    self.xhat[k] = _fd_norm(self.norm, self.l[k], ones, zeros)
                self.a[k] = activation_reference(cfg.activation, self._norm(k, self.l[k]))

    def _norm(self, k: int, z: torch.Tensor) -> torch.Tensor:
        if self.norm == "none":
            return z
        return _fd_norm(self.norm, z, self.p[f"gamma{k}"], self.p[f"beta{k}"])

    def tail(
        self, k: int, z: torch.Tensor, normed: bool, rows: slice
    ) -> tuple[float, list[torch.Tensor]]:
        """Loss summed over `rows` / the loss's count, from layer k's `z` (l{k}, or its
        normalized value when `normed`), and the sign masks of every kinked pre-activation."""
        masks = []
        while True:
            if k == self.L:
                return self._loss(z, rows), masks
            if not normed:
                z = self._norm(k, z)
            if self.kinked:
                masks.append(z > 0)
            a = activation_reference(self.cfg.activation, z)
            k, normed = k + 1, False
            z = a @ self.p[f"w{k}"] + self.p[f"b{k}"]

    def _loss(self, out: torch.Tensor, rows: slice) -> float:
        target = self.target[rows]
        if self.cfg.loss == "cross_entropy":
            total = F.cross_entropy(out, target, reduction="sum")
        else:
            total = (out - target).pow(2).sum()
        return total.item() / self.count

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
        """The central difference at one entry and the rounding it carries (float64's eps
        on the two losses, over 2h); None when a kink lies within +-h."""
        value = self.p[name].reshape(-1)[index].item()
        h = FD_REL_STEP * max(1.0, abs(value))
        k, add, normed, rows = self.perturbed(name, index, h)
        if normed and k not in self.n:
            self.n[k] = self._norm(k, self.l[k])
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
    from app.tensors import input_specs

    specs = [s for s in input_specs(cfg) if s.role != "target"]
    rows = math.prod(specs[0].shape[:-1])
    return rows, [(s.name, math.prod(s.shape), _split_name(s.name)[1]) for s in specs]


def fd_cost_flops(cfg) -> float:
    """About how much float64 work `finite_difference_check` does: two passes per sample,
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
        total += min(cfg.fd_samples, numel) * 2 * per_pass
    return total


def finite_difference_check(
    cfg,
    tensors: Mapping[str, torch.Tensor],
    manual: Mapping[str, torch.Tensor],
    rounding_noise: Mapping[str, float] | None = None,
) -> dict[str, dict[str, float | int | None]]:
    """Float64 central differences at `cfg.fd_samples` entries of every gradient.

    Entries are drawn by a generator seeded from the run's seed (+ FD_SEED_OFFSET). With
    relu/leaky_relu, an entry whose +-h passes change any pre-activation's sign (a kink
    within reach) is skipped for the next candidate, so `samples` may come out smaller.
    max_abs_err is over the samples; max_rel_err divides it by the gradient's scale: the
    larger of max|manual gradient| over the whole tensor and max|difference| over the samples
    (so an all-zero or shrunken manual gradient shows an error near 1), or for a gradient
    that cancels to ~0 by the scale of the terms it sums (`cancelling_scale`). `allclose`:
    max_abs_err <= FD_RTOL * scale, plus the differences' own rounding (float64's eps on the
    two losses over 2h: large when the loss is large and the gradient small), plus
    NOISE_FACTOR times the gradient's `rounding_noise` where the autograd check measured it.
    """
    net = _FDNet(cfg, tensors)
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
            <= rtol * scale + own + NOISE_FACTOR * (rounding_noise or {}).get(name, 0.0),
            "rtol": rtol,
        }
    return report
