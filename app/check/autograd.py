"""The check: every manual gradient against torch.autograd on fresh leaves.

Autograd differentiates the reference forward pass (app/check/reference.py's `forward`), written
independently of app.ops with torch.nn.functional, so a mistake in an op's forward cannot hide
the same mistake in its check.

The tolerance (`compare`, per dtype) is app/check/tolerance.py's, the one every check and
every exported file uses; whether a failing run is rechecked in the other precision is
app/check/recheck.py's rule; which passing gradients are suspect is app/check/suspect.py's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from app.check import reference
from app.check.tolerance import compare, noise_between
from app.ops.base import split_variant


def reference_loss(
    cfg, leaves: Mapping[str, torch.Tensor], keep: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """The reference loss (app/check/reference.py), for autograd to differentiate.

    With `keep`, the intermediates `out`, `l{k}`, `n{k}`, `a{k}` that need a gradient are
    stored there with `retain_grad()`, so their gradients can be checked too."""
    if keep is None:
        return reference.forward(cfg, leaves)
    return reference.forward_keeping(cfg, leaves, keep)


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
    recheck: bool,
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
    cases are small ones): the caller passes that rule's verdict (`recheck`, from
    app/check/recheck.py, weighed from shapes); only finite gradients are rechecked.
    """
    sections = (check["tensors"], check["intermediates"])
    if all(c["allclose"] for section in sections for c in section.values()):
        return check
    if not recheck:
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
            noise = noise_between(pairs)
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
