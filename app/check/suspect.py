"""`suspect`: a gradient within tolerance whose error is more than rounding explains (an eps
dropped or changed, Bessel's n - 1 at a large batch). The check passes it; the page warns.

Both verdicts ask one question, "is this error above what rounding gives on this very run?",
and measure rounding the only way each kind of run can:

- a run (`mark_suspects`) has the built-in formula for every gradient a learner replaced: its
  error against autograd on the same tensors is what rounding gives here, at no extra pass;
- a program has no built-in formula to hold the learner's lines against, so it reruns them in
  float64 (app/programs/plan.py decides when, from the program's estimated seconds, as a
  run's recheck is decided from its bytes): float64's own rounding is the float32 noise
  2**-29 finer (FINER), and a formula that is not exactly the derivative still differs far
  above it (app/programs/check.py `_Comparisons.suspect`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from app.check.tolerance import max_abs_diff
from app.ops.base import split_variant

# A run's gradient within tolerance is `suspect` when its error is over SUSPECT_RATIO times the
# built-in formula's own error on the same run and over SUSPECT_ULPS ulps of its scale.
SUSPECT_RATIO = 10
SUSPECT_ULPS = 4
FINER = 2.0**-29  # float64's unit roundoff over float32's


def mark_suspects(
    check: dict,
    manual: Mapping[str, torch.Tensor],
    builtin: Mapping[str, torch.Tensor] | None,
    reference: Mapping[str, torch.Tensor],
    inter: Mapping[str, torch.Tensor],
) -> dict:
    """Set `suspect` on every entry of a run's check, and `check["suspects"]`, the names flagged.

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
            own = max_abs_diff(builtin[key], target)
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
