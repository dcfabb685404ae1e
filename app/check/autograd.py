"""The check: every manual gradient against torch.autograd on fresh leaves.

Autograd differentiates the reference forward pass (app/check/reference.py's `forward`), written
independently of app.ops with torch.nn.functional, so a mistake in an op's forward cannot hide
the same mistake in its check.

Tolerances (per dtype): an element passes when |manual - autograd| <= atol + rtol * |autograd|
with atol = atol_scale * max|autograd|. The absolute part scales with the gradient, so tiny
entries next to large ones do not fail on rounding alone, while an all-zero (or otherwise
wrong) manual gradient still fails on the large entries. Both are reported per tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from app.check import reference
from app.cost.plan import RECHECK_MAX_BYTES, gets_recheck  # noqa: F401  (the one recheck rule)
from app.ops.base import split_variant

NOISE_FACTOR = 4  # a gradient may differ from autograd by 4x their rounding errors together
COMPARE_CHUNK = 1 << 20  # elements per comparison pass

# rtol, atol_scale. float32 sums over a batch round at ~1e-7 relative; 1e-4/1e-5 leaves a wide
# margin for deep nets while any real error in a formula is orders of magnitude larger.
TOLERANCES = {
    torch.float32: (1e-4, 1e-5),
    torch.float64: (1e-9, 1e-12),
}


def reference_loss(
    cfg, leaves: Mapping[str, torch.Tensor], keep: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """The reference loss (app/check/reference.py), for autograd to differentiate.

    With `keep`, the intermediates `out`, `l{k}`, `n{k}`, `a{k}` that need a gradient are
    stored there with `retain_grad()`, so their gradients can be checked too."""
    stages: dict[str, torch.Tensor] | None = {} if keep is not None else None
    loss = reference.forward(cfg, leaves, stages)
    for name, t in (stages or {}).items():
        if t.requires_grad:
            t.retain_grad()
            keep[name] = t
    return loss


def autograd_gradients(
    cfg,
    tensors: Mapping[str, torch.Tensor],
    intermediates: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """d loss / d every float input, by loss.backward() on fresh leaves.

    `detach()` makes new leaves that share storage with the run's tensors: nothing is copied.
    With `intermediates`, d loss / d `out` and each `l{k}`, `n{k}`, `a{k}` are put there too.
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

    Chunk by chunk, so the temporaries stay a few MB however large the gradient. NaN
    compares false, so a non-finite entry on either side fails allclose (inf - inf is NaN
    too). `atol_floor` raises the scale of atol for a gradient that cancels to ~0 (see
    `cancelling_scale`); `rounding_noise` is the rounding error both sides carry (see
    `recheck_rounding`).
    """
    rtol, atol_scale = TOLERANCES[reference.dtype]
    if reference.numel() == 0:
        return dict(
            max_abs_err=0.0, max_rel_err=0.0, allclose=True, exact=True, rtol=rtol, atol=0.0
        )
    flat_m, flat_r = manual.reshape(-1), reference.reshape(-1)
    scale = torch.maximum(flat_r.max(), -flat_r.min()).item()  # max|reference|, NaN kept
    # never stricter than the rounding both sides carry, where that is known (recheck_rounding)
    atol = max(atol_scale * max(scale, atol_floor), NOISE_FACTOR * rounding_noise)
    chunk_max, allclose = [], True
    for start in range(0, flat_r.numel(), COMPARE_CHUNK):
        m, r = flat_m[start : start + COMPARE_CHUNK], flat_r[start : start + COMPARE_CHUNK]
        diff = (m - r).abs_()
        chunk_max.append(diff.max())
        allclose &= bool((diff <= r.abs().mul_(rtol).add_(atol)).all())
    max_abs = torch.stack(chunk_max).max().item()
    if scale > 0:
        max_rel = max_abs / scale
    else:
        max_rel = 0.0 if max_abs == 0 else float("inf")
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


def cast_floats(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """The run's tensors in another precision (the integer target as it is)."""
    return {n: t.to(dtype) if t.is_floating_point() else t for n, t in tensors.items()}


def recheck_rounding(
    cfg,
    tensors: Mapping[str, torch.Tensor],
    manual: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    inter: Mapping[str, torch.Tensor],
    check: dict,
    manual_at: Callable[[torch.dtype], Mapping[str, torch.Tensor]],
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
    if not gets_recheck(sum(t.numel() * t.element_size() for t in held)):
        return check
    other = torch.float64 if tensors["x"].dtype == torch.float32 else torch.float32
    inter_other: dict[str, torch.Tensor] = {}
    reference_other = autograd_gradients(cfg, cast_floats(tensors, other), inter_other)
    manual_other = manual_at(other)
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


# A gradient within tolerance is `suspect` when its error is over SUSPECT_RATIO times the
# built-in formula's own error on the same run and over SUSPECT_ULPS ulps of its scale: more
# than rounding explains (eps dropped or changed, Bessel's n-1 at a large batch).
SUSPECT_RATIO = 10
SUSPECT_ULPS = 4


def mark_suspects(
    check: dict,
    manual: Mapping[str, torch.Tensor],
    builtin: Mapping[str, torch.Tensor] | None,
    reference: Mapping[str, torch.Tensor],
    inter: Mapping[str, torch.Tensor],
) -> dict:
    """Set `suspect` on every entry of the check, and `check["suspects"]`, the names flagged.

    `builtin`: the run's gradients by the built-in formulas alone (None when no learner
    formula replaced any: then every gradient is the built-in one and none is suspect). The
    built-in formula's error against autograd on the same run is the measure of what rounding
    gives here; the learner's error is compared with it, not with a fixed number. Where they
    differ, the entry also has `builtin_max_abs_err`, for the page's line on why."""
    suspects = []
    for section, ref in ((check["tensors"], reference), (check["intermediates"], inter)):
        for key, result in section.items():
            result["suspect"] = False
            if builtin is None or key not in builtin or builtin[key] is manual[key]:
                continue
            target = ref[split_variant(key)[0]]
            own = _max_abs_diff(builtin[key], target)
            result["builtin_max_abs_err"] = own
            err = result["max_abs_err"]
            ulp = torch.finfo(target.dtype).eps * target.abs().max().item()
            result["suspect"] = bool(
                result["allclose"] and err > SUSPECT_RATIO * own and err > SUSPECT_ULPS * ulp
            )
            if result["suspect"]:
                suspects.append(key)
    check["suspects"] = suspects
    return check


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return max(
        ((a.reshape(-1)[i : i + COMPARE_CHUNK] - b.reshape(-1)[i : i + COMPARE_CHUNK]).abs().max()
         .item() for i in range(0, b.numel(), COMPARE_CHUNK)),
        default=0.0,
    )  # fmt: skip
