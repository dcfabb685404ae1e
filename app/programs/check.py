"""A program's check: every gradient the learner's backward wrote against autograd's, with
the hint that names the slip, and the views of each gradient for the page.

The tolerance is the runs' own (app/check/tolerance.py `compare`, `noise_between`). Two rules
differ from a run's check (app/check/autograd.py), because a program has no built-in formula:
- the rerun: a run reruns in the other precision only when its check fails and it is small
  (app/check/recheck.py, by bytes), since its suspect verdict needs no rerun; a program reruns
  in float64 whenever it is float32 and cheap (app/programs/plan.py `Plan.rerun`, by
  estimated seconds: a program's sizes are only known by running it), since the rerun is
  also its only measure of rounding for `suspect`;
- the suspect verdict: the float64 rerun's (`_Comparisons.suspect`), not `mark_suspects` (its
  docstring says why).
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import replace
from typing import Any

import torch

from app.check.batched import Flats, compare_many, noise_many
from app.check.suspect import FINER
from app.check.tolerance import TOLERANCES, compare, noise_between
from app.lab import hints
from app.lab.statements import ProgramError
from app.ops.traced import Traced
from app.programs import slips
from app.programs.outcome import Outcome
from app.programs.plan import GRAD_PREFIX, Plan
from app.programs.schemas import ProgramRequest
from app.schemas import MAX_RESPONSE_CELLS
from app.views.heatmap import (
    add_reference,
    at_precision_all,
    gradient_view,
    own_view,
    response_max_cells,
)

# --------------------------------------------------------------------------- the check


def check_table(plan: Plan, main: Outcome, rerun: Outcome | None, loss_name: str) -> dict[str, Any]:
    """Every tensor with a gradient, in the order the backward finishes them (then the
    unwritten ones, from the loss back)."""
    # a gradient whose float64 rerun stopped before its last line has no float64 value: the
    # recheck that cannot run is no evidence (its zeros would read as a 100% error)
    unrechecked = {n for n in main.manual if rerun is not None and not _rechecked(n, main, rerun)}
    if unrechecked:
        rerun = _without(rerun, unrechecked)
    rerun_error = rerun.error if rerun is not None else None
    order = _check_order(plan, main, loss_name)
    written = [n for n in order if n in main.manual]
    numbers = _Comparisons(main, rerun, written)  # every comparison below, made at once
    rows: dict[str, dict[str, Any]] = {}
    first_failure = None
    for name in order:
        auto = main.autograd[name]
        rtol, atol_scale = TOLERANCES[auto.dtype]
        if name not in main.manual:
            rows[name] = {"written": False, "shape_ok": False, "exact": False, "allclose": False,
                          "suspect": False, "max_abs_err": None, "max_rel_err": None,
                          "rtol": rtol, "atol": None, "lines": [], "hint": None}  # fmt: skip
            continue
        manual = main.manual[name]
        row: dict[str, Any] = {"written": True, "lines": main.lines.get(name, []),
                               "spelling": main.spelling.get(name), "suspect": False,
                               "hint": None}  # fmt: skip
        if tuple(manual.shape) != tuple(auto.shape) and _same_entries(manual.shape, auto.shape):
            # (64,) written for (1, 64): the same numbers in the same order (PyTorch's
            # allclose, as a notebook's cmp() uses it, broadcasts one onto the other)
            row["shape_note"] = (
                f"{main.spelling.get(name, name)} is {hints.fmt_shape(tuple(manual.shape))}, "
                f"{name} is {hints.fmt_shape(tuple(auto.shape))}: the same entries; "
                "keepdim=True would make the shapes equal too"
            )
            row["made"] = list(manual.shape)
            manual = manual.reshape(auto.shape)
            main.manual[name] = manual
            if rerun is not None and name in rerun.manual:
                rerun.manual[name] = rerun.manual[name].reshape(auto.shape)
        if tuple(manual.shape) != tuple(auto.shape):
            row.update(shape_ok=False, exact=False, allclose=False, max_abs_err=None,
                       max_rel_err=None, rtol=rtol, atol=None,
                       shape=list(manual.shape), wanted=list(auto.shape))  # fmt: skip
            steps = [s.as_dict() for ln in row["lines"][-1:] if ln in plan.backward_lines
                     for s in plan.backward_lines[ln].steps]  # fmt: skip
            row["hint"] = hints.result_shape(
                main.spelling.get(name, name), tuple(manual.shape), tuple(auto.shape), steps, name
            )
        elif not manual.is_floating_point():
            row.update(shape_ok=True, exact=False, allclose=False, max_abs_err=None,
                       max_rel_err=None, rtol=rtol, atol=None)  # fmt: skip
            row["hint"] = f"{main.spelling.get(name)} is an integer tensor: a gradient is float"
        else:
            noise = numbers.noise(name)
            result = numbers.compare(name)
            if noise:
                result["rounding_noise"] = noise
            row.update(result, shape_ok=True)
            row["exact"] = bool(torch.equal(manual.to(auto.dtype), auto))
            if rerun is not None and result["allclose"] and name in rerun.manual:
                # app/check/suspect.py: a sum that cancels to 0 is still noise in float64, a
                # dropped eps is far above it
                strict = numbers.suspect(name)
                if strict is not None:
                    row["suspect"] = True
                    row["float64_rel_err"] = strict["max_rel_err"]
                    row["why"] = (
                        f"within float32's tolerance, but the same line in float64 still "
                        f"differs from autograd by {strict['max_rel_err']:.1e} (relative), "
                        "far above float64's rounding: the formula is not exactly the "
                        "forward's derivative (a changed eps? n vs n - 1?)"
                    )
            if name in unrechecked:
                row["recheck"] = _recheck_note(name, main, rerun_error)
            if not row["allclose"]:

                def close(g: torch.Tensor, h: torch.Tensor, noise: float = noise) -> bool:
                    return bool(compare(g.to(h.dtype), h, rounding_noise=noise)["allclose"])

                row["hint"] = _slip_hint(name, manual, auto, plan, main, close)
        if first_failure is None and (not row["allclose"]):
            first_failure = name
        rows[name] = row
    for name, row in rows.items():
        if first_failure and row["written"] and name != first_failure and not row["allclose"]:
            row["after"] = first_failure  # may be wrong only because it uses a wrong gradient
    written_rows = [r for r in rows.values() if r["written"]]
    return {
        "reference": "torch.autograd",
        # the tolerance verdict over what is written; `all_written` says whether that is all
        "all_close": bool(written_rows) and all(r["allclose"] for r in written_rows),
        "all_written": all(r["written"] for r in rows.values()),
        "written": len(written_rows),
        "total": len(rows),
        "suspects": [n for n, r in rows.items() if r.get("suspect")],
        "first_failure": first_failure,
        "tensors": rows,
    }


def _check_order(plan: Plan, main: Outcome, loss_name: str) -> list[str]:
    """The check's rows: the gradients written, in the order they are finished (their last
    write: a gradient built over several lines, `dx = ...` then `dx += ...`, comes after what
    its last line used), then the unwritten ones from the loss back (the loss's own gradient
    is 1: checked only when the backward writes it)."""
    written = sorted(main.manual, key=lambda n: (max(main.lines.get(n, [10**9])), n))
    unwritten = [n for n in reversed(plan.has_grad) if n not in main.manual and n != loss_name]
    return written + unwritten


class _Comparisons:
    """The numbers of a program's check, every gradient's at once (app/check/batched.py:
    the same numbers as one `compare` and `noise_between` a gradient, in a few numpy passes):
    each written gradient's rounding noise and comparison with autograd, and, for those
    within tolerance, the float64 rerun's (`suspect`). A gradient is taken as `check_table`
    takes it: in autograd's shape when it holds the same entries; one that is still of
    another shape, or not a float tensor, has none of these."""

    def __init__(self, main: Outcome, rerun: Outcome | None, written: list[str]) -> None:
        self.main, self.rerun = main, rerun
        self.flats = Flats()  # each tensor's entries as numpy once, for every pass below
        self.pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # (manual, autograd)
        self.rerun_manual: dict[str, torch.Tensor] = {}
        for name in written:
            auto = main.autograd[name]
            manual = _in_shape_of(main.manual[name], auto)
            m64 = rerun.manual.get(name) if rerun is not None else None
            if manual is not main.manual[name] and m64 is not None:  # reshaped: both alike
                m64 = m64.reshape(auto.shape)
            if not _comparable(manual, auto):
                continue
            self.pairs[name] = (manual, auto)
            if m64 is not None:
                self.rerun_manual[name] = m64
        if main.rounding is not None:
            self.noises = {n: main.rounding.get(n, 0.0) for n in self.pairs}
        else:
            self.noises = self._rounding_noises()
        names = list(self.pairs)
        results = compare_many([(m.to(a.dtype), a) for m, a in self.pairs.values()],
                               [self.noises[n] for n in names], self.flats)  # fmt: skip
        self.results = dict(zip(names, results))
        self.strict: dict[str, dict | None] | None = None  # the float64 rerun's, when asked

    def _rounding_noises(self) -> dict[str, float]:
        """Every gradient's rounding noise: how far both sides move between the run's
        precision and float64 (`noise_between`; a gradient that cancels to about 0, a bias
        before a batchnorm, is then judged by its rounding, not by its own tiny scale)."""
        noises = dict.fromkeys(self.pairs, 0.0)
        quads, names = [], []
        for name, (m, a) in self.pairs.items():
            m64 = self.rerun_manual.get(name)
            if m64 is None or m.shape != m64.shape or not m64.is_floating_point():
                continue
            if m.numel() == 0:  # an empty gradient (of an `x[range(0)]`) carries no rounding
                continue
            quads.append(((m, m64), (a, self.rerun.autograd[name])))
            names.append(name)
        for name, noise in zip(names, noise_many(quads, self.flats)):
            noises[name] = noise if math.isfinite(noise) else 0.0
        return noises

    def noise(self, name: str) -> float:
        return self.noises[name]

    def compare(self, name: str) -> dict[str, Any]:
        return dict(self.results[name])

    def suspect(self, name: str) -> dict | None:
        """The float64 rerun's comparison of a gradient within tolerance when it fails at
        float64's own rounding (the float32 noise times FINER: app/check/suspect.py), else
        None; None too when the rerun's gradient is not a float tensor of autograd's shape.
        Every such gradient's at the first call."""
        if self.strict is None:
            self.strict = {}
            judged = []
            for n, result in self.results.items():
                m64 = self.rerun_manual.get(n)  # (in autograd's shape, as `pairs`)
                if not result["allclose"] or m64 is None:
                    continue
                if m64.shape != self.rerun.autograd[n].shape or not m64.is_floating_point():
                    self.strict[n] = None  # not judged
                else:
                    judged.append(n)
            pairs = [(self.rerun_manual[n].to(self.rerun.autograd[n].dtype),
                      self.rerun.autograd[n]) for n in judged]  # fmt: skip
            results = compare_many(pairs, [self.noises[n] * FINER for n in judged], self.flats)
            for n, result in zip(judged, results):
                self.strict[n] = None if result["allclose"] else result
        return self.strict.get(name)


def _rechecked(name: str, main: Outcome, rerun: Outcome) -> bool:
    """Whether the float64 rerun ran every line that writes `name`, as the run did."""
    if name not in rerun.manual or rerun.lines.get(name) != main.lines.get(name):
        return False
    stop = rerun.error.line if rerun.error is not None else None
    if stop is None:
        return True
    return bool(stop) and stop > max(main.lines.get(name, [0]))


def _without(rerun: Outcome, names: set[str]) -> Outcome:
    """The rerun without the gradients it could not finish."""
    keep = {n: g for n, g in rerun.manual.items() if n not in names}
    return replace(rerun, manual=keep)


def _recheck_note(name: str, main: Outcome, error: ProgramError | None) -> str:
    where = f" at line {error.line}" if error is not None and error.line else ""
    why = str(error).splitlines()[0] if error is not None else "it wrote no float64 value"
    return (
        f"checked in the run's dtype only: the float64 recheck of {main.spelling.get(name, name)} "
        f"could not run{where} ({why}), so it says nothing about the formula"
    )


def _in_shape_of(t: torch.Tensor, auto: torch.Tensor) -> torch.Tensor:
    """`t` in autograd's shape where it holds the same entries (as `check_table` takes a
    gradient), else as it is."""
    if tuple(t.shape) != tuple(auto.shape) and _same_entries(t.shape, auto.shape):
        return t.reshape(auto.shape)
    return t


def _comparable(manual: torch.Tensor, auto: torch.Tensor) -> bool:
    """A gradient the check compares entry by entry: autograd's shape, a float tensor."""
    return tuple(manual.shape) == tuple(auto.shape) and manual.is_floating_point()


def _same_entries(a: tuple, b: tuple) -> bool:
    """Shapes that differ only by size-1 dims: one tensor's entries are the other's."""
    return [d for d in a if d != 1] == [d for d in b if d != 1]


def recheck_float64(table: dict[str, Any], main: Outcome, low: Outcome) -> dict[str, Any]:
    """A float64 run's failures judged again, knowing its rounding: a gradient that cancels to
    about 0 (a bias before a batchnorm) is rounding noise on both sides, as in float32. The
    same program in float32 (`low`) measures how far rounding moves each side; float64's own
    rounding is that, 2**-29 finer (the mirror of `_Comparisons`' float64 rerun). A slip,
    a `.float()` included, stands far above it."""
    rows = table["tensors"]
    for name, row in rows.items():
        if not row["written"] or row["allclose"] or not row.get("shape_ok"):
            continue
        m, a = main.manual[name], main.autograd[name]
        m32, a32 = low.manual.get(name), low.autograd.get(name)
        if m32 is None or m32.numel() != m.numel() or not m32.is_floating_point():
            continue
        pairs = ((m.double(), m32.reshape(m.shape)), (a.double(), a32))
        if not all(bool(torch.isfinite(t).all()) for pair in pairs for t in pair):
            continue
        noise = FINER * noise_between(pairs)
        result = compare(m.to(a.dtype), a, rounding_noise=noise)
        if result["allclose"]:
            row.update(result, rounding_noise=noise, hint=None)
            row.pop("after", None)
    failing = [n for n, r in rows.items() if r["written"] and not r["allclose"]]
    table["first_failure"] = failing[0] if failing else None
    for name, row in rows.items():
        row.pop("after", None)
        if failing and name in failing and name != failing[0]:
            row["after"] = failing[0]
    written = [r for r in rows.values() if r["written"]]
    table["all_close"] = bool(written) and all(r["allclose"] for r in written)
    return table


def _slip_hint(
    name: str,
    manual: torch.Tensor,
    auto: torch.Tensor,
    plan: Plan,
    main: Outcome,
    close: slips.Close,
) -> str | None:
    """The classic slips of these exercises, recognized from the numbers and the code (the
    chapters after the MLP: app/programs/slips.py)."""
    spelled = main.spelling.get(name, name)
    lines = main.lines.get(name, [])
    found = slips.numbers_hint(name, manual, auto, plan, main, close)
    if found:
        return found
    reads = slips.tensor_uses(plan, name)
    if len(reads) > 1 and len(lines) == 1:
        return code_hint(name, spelled, lines, plan)
    scale = _scale(manual, auto)
    if scale is not None:
        for n in sorted({d for t in main.forward.values() if isinstance(t, Traced)
                         for d in t.t.shape if d > 2}):  # fmt: skip
            for ratio, what in ((n / (n - 1), "n / (n - 1)"), ((n - 1) / n, "(n - 1) / n")):
                if abs(scale - ratio) < 1e-3 * ratio:
                    return (
                        f"{spelled} is off by the factor {what} with n = {n}: Bessel's "
                        "correction. The forward's variance and the backward must divide by "
                        "the same n - 1 (or n)"
                    )
    return code_hint(name, spelled, lines, plan)


def code_hint(name: str, spelled: str, lines: list[int], plan: Plan) -> str | None:
    """The slips read from the code alone (no numbers), for a gradient that fails: a tensor
    used twice whose gradient is written once, tanh's derivative taken from its input. The
    exported file carries these for its failing gradients (app/export/program.py)."""
    found = slips.loop_hint(name, spelled, lines, plan)
    if found:
        return found
    reads = slips.tensor_uses(plan, name)
    if len(reads) > 1 and len(lines) == 1:
        return (
            f"{name} is used by {len(reads)} forward lines ({', '.join(map(str, reads))}): its "
            f"gradient is the sum of what each use sends back. Did one use's share get lost? "
            f"Accumulate the second with `{spelled} += ...`"
        )
    for stmt in plan.forward.body:
        if not isinstance(stmt, ast.Assign) or not isinstance(stmt.targets[0], ast.Name):
            continue
        out = stmt.targets[0].id
        pre = _tanh_argument(stmt.value)
        if pre == name:
            code = " ".join(
                plan.backward_lines[ln].code for ln in lines if ln in plan.backward_lines
            )
            if re.search(rf"\b{re.escape(pre)}\s*\*\*\s*2", code):
                return (
                    f"tanh's derivative is 1 - tanh(x)**2, taken from tanh's output: "
                    f"1 - {out}**2, not 1 - {pre}**2"
                )
    return None


def _tanh_argument(node: ast.expr) -> str | None:
    """`pre` in `torch.tanh(pre)` or `pre.tanh()`."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
        return None
    if node.func.attr != "tanh":
        return None
    if isinstance(node.func.value, ast.Name) and node.func.value.id in ("torch", "F"):
        arg = node.args[0] if node.args else None
    else:
        arg = node.func.value
    return arg.id if isinstance(arg, ast.Name) else None


def _scale(manual: torch.Tensor, auto: torch.Tensor) -> float | None:
    """The factor c with manual ~= c * autograd, when one factor explains the difference."""
    a, m = auto.double().reshape(-1), manual.double().reshape(-1)
    denom = float((a * a).sum())
    if denom == 0 or not math.isfinite(denom):
        return None
    c = float((a * m).sum()) / denom
    residual = float((m - c * a).abs().max())
    return c if residual <= 1e-4 * float(a.abs().max()) * max(1.0, abs(c)) else None


# --------------------------------------------------------------------------- views


def tensor_table(req: ProgramRequest, plan: Plan, main: Outcome) -> dict[str, Any]:
    table: dict[str, Any] = {}

    def add(name: str, t: Any, role: str) -> None:
        if isinstance(t, Traced):
            t = t.t
        if isinstance(t, torch.Tensor):
            table[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                           "role": role, "bytes": t.numel() * t.element_size()}  # fmt: skip

    for name, value in main.inputs.items():
        add(name, value, "param" if name in plan.has_grad else "input")
    for name in plan.intermediates:
        add(name, main.forward.get(name), "loss" if name == req.loss else "intermediate")
    for tensor, value in main.manual.items():
        add(main.spelling.get(tensor, GRAD_PREFIX + tensor), value, "gradient")
    for name, value in main.helpers.items():
        if name not in table:
            add(name, value, "helper")
    return table


# the heatmaps' numbers, in significant digits (app/views/heatmap.py: at_precision_all): the
# makemore answer's maps in 26% fewer bytes
HEATMAP_DIGITS = 5


def _view_cells(req: ProgramRequest, main: Outcome, names: list[str]) -> int:
    sizes = [main.autograd[n].numel() for n in names]
    return response_max_cells(sizes, req.max_cells, 4, MAX_RESPONSE_CELLS)


def own_views(req: ProgramRequest, plan: Plan, main: Outcome) -> dict[str, Any]:
    """What `gradient_views` draws of the run alone: each written float gradient of
    autograd's shape (or its entries), on its own. Drawn while the float64 rerun is on its
    way from another worker; `gradient_views` adds what the check decides."""
    names = _check_order(plan, main, req.loss)
    cells = _view_cells(req, main, names)
    views = {}
    for name in main.manual:
        auto = main.autograd[name]
        manual = _in_shape_of(main.manual[name], auto)
        if _comparable(manual, auto):
            views[name] = own_view(manual.to(auto.dtype), cells)
    return {"cells": cells, "views": views}


def gradient_views(req: ProgramRequest, plan: Plan, main: Outcome, table: dict,
                   drawn: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Every checked tensor's view. `drawn`: `own_views` of this run, made before the check
    (the same maps, drawn earlier)."""
    names = list(table["tensors"])
    cells = _view_cells(req, main, names)
    ready = drawn["views"] if drawn is not None and drawn["cells"] == cells else {}
    views: dict[str, Any] = {}
    for name in names:
        row = table["tensors"][name]
        auto = main.autograd[name]
        if row["written"] and row["shape_ok"] and main.manual[name].is_floating_point():
            tol = (row["rtol"], row["atol"]) if row.get("atol") is not None else None
            manual = main.manual[name].to(auto.dtype)
            view = ready[name] if name in ready else own_view(manual, cells)
            if req.reference_heatmaps:
                # autograd's map and the tolerance's, where asked (the page asks); no
                # diff_heatmap: the program page draws the difference in units of the
                # tolerance (tolerance_heatmap), and the contract lists neither
                add_reference(view, manual, cells, auto, tol, difference=False)
            view["source"] = "manual"
        elif row["written"] and main.manual[name].is_floating_point():
            view = gradient_view(main.manual[name], cells)
            view["source"] = "manual"
            view["autograd"] = gradient_view(auto, cells)
        else:
            view = gradient_view(auto, cells)
            view["source"] = "autograd"
        views[name] = view
    at_precision_all(list(views.values()), HEATMAP_DIGITS)
    return views
