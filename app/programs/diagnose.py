"""A program's diagnoses: for every written gradient that fails the check, why
(app/check/diagnosis.py decides; this module gathers what it needs from the program).

- upstream: which gradients each gradient's lines read, through the backward's helpers
  (read from the backward's tree, no run);
- missing_branch: one part per forward line that reads the tensor: that line's expression
  evaluated again on a fresh leaf for the tensor (the line's other names held fixed), and
  its vector-Jacobian product with autograd's gradient of what the line assigns;
- dropped_duplicates: what the backward's indexed `+=` lost to one write per repeated index
  (recorded as it ran: BackwardRun.dropped);
- precision: autograd's gradients with the program run again in float32 (a float64 run only,
  only when a failing gradient is within float32's tolerance, and only for a run estimated
  under PRECISION_RERUN_MAX_S).
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from typing import Any

import torch

from app.check.diagnosis import MAX_PARTS, Evidence, diagnose, link_roots
from app.check.tolerance import compare
from app.lab.allowlist import FormulaError, Pair
from app.ops.traced import Traced
from app.programs.check import Outcome
from app.programs.plan import GRAD_PREFIX, GRAD_SUFFIX, ForwardRun, Plan
from app.programs.slips import tensor_uses, tied_hint

PRECISION_RERUN_MAX_S = 0.6  # the float32 rerun that `precision` needs, for runs under this
# a line that draws random numbers cannot be evaluated again to the same values
RANDOM_CALLS = frozenset({"rand", "randn", "randint", "randperm", "dropout", "multinomial",
                          "normal", "bernoulli", "rand_like", "randn_like"})  # fmt: skip


def diagnose_table(
    table: dict[str, Any],
    plan: Plan,
    main: Outcome,
    lower: Callable[[], dict[str, torch.Tensor] | None] | None = None,
) -> dict[str, Any]:
    """Set `diagnosis` on every row of the check (null on a passing or unwritten one).
    `lower`: autograd's gradients in float32 (for a float64 run), computed at most once."""
    rows = table["tensors"]
    cached: dict[str, Any] = {}
    deps: dict[str, set[str]] = {}
    sizes: tuple[int, ...] = ()
    if any(row["written"] and not row["allclose"] for row in rows.values()):
        # (only a failing row needs them: an all-close program skips the walk over its code)
        deps, sizes = gradient_reads(plan), _sizes(main)

    def lower_grads() -> dict[str, torch.Tensor] | None:
        if "lower" not in cached:
            cached["lower"] = lower() if lower is not None else None
        return cached["lower"]

    for name, row in rows.items():
        row["diagnosis"] = None
        if not row["written"] or row["allclose"]:
            continue
        G, R = main.manual[name], main.autograd[name]
        failing = [d for d in deps.get(name, ()) if d != name and d in rows
                   and rows[d]["written"] and not rows[d]["allclose"]]  # fmt: skip
        up = max(failing, key=lambda d: list(rows).index(d)) if failing else None
        noise = row.get("rounding_noise", 0.0)
        ev = Evidence(
            spelled=main.spelling.get(name, GRAD_PREFIX + name),
            upstream=main.spelling.get(up, GRAD_PREFIX + up) if up else None,
            upstream_tensor=up,
            sizes=sizes,
            parts=lambda name=name: branch_parts(plan, main, name),
            duplicates=(lambda name=name: main.dropped.get(name)),
            lower=(lambda name=name: (lower_grads() or {}).get(name)),
            lower_close=lambda a, b: bool(compare(a, b)["allclose"]),
            hint=row.get("hint"),
        )

        def close(g: torch.Tensor, h: torch.Tensor, noise: float = noise) -> bool:
            return bool(compare(g.to(h.dtype), h, rounding_noise=noise)["allclose"])

        row["diagnosis"] = diagnose(G, R, close, ev)
        if row["diagnosis"]["kind"] == "missing_branch":  # a tied head or embedding named
            row["hint"] = tied_hint(name, row["diagnosis"]["missing"], plan, main) or row["hint"]
    link_roots([rows], lambda n: main.spelling.get(n, GRAD_PREFIX + n))
    return table


# --------------------------------------------------------------------------- upstream


def gradient_reads(plan: Plan) -> dict[str, set[str]]:
    """tensor -> the gradients (by tensor name) the lines writing its gradient read, directly
    or through the backward's helpers (`dh = dlogits @ W2.T`, a helper, then `dW = ... dh`).
    Loops are walked twice, so what one iteration hands the next is counted."""
    has_grad = set(plan.has_grad)

    def grad_of(name: str) -> str | None:
        if name.endswith(GRAD_SUFFIX):
            return name.removesuffix(GRAD_SUFFIX)
        if name.startswith(GRAD_PREFIX) and name[1:] in has_grad:
            return name[1:]
        return None

    helpers: dict[str, set[str]] = {}  # helper -> the gradients it was made from
    reads: dict[str, set[str]] = {}

    def read_in(node: ast.AST) -> set[str]:
        found: set[str] = set()
        for sub in ast.walk(node):
            if (
                isinstance(sub, ast.Attribute)
                and sub.attr == "g"
                and isinstance(sub.value, ast.Name)
            ):
                found.add(sub.value.id)
            elif isinstance(sub, ast.Name):
                tensor = grad_of(sub.id)
                if tensor is not None:
                    found.add(tensor)
                else:
                    found |= helpers.get(sub.id, set())
        return found

    def targets(stmt: ast.stmt) -> list[str]:
        nodes = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        names = []
        for node in nodes:
            for sub in node.elts if isinstance(node, ast.Tuple) else [node]:
                while isinstance(sub, ast.Subscript):
                    sub = sub.value
                if isinstance(sub, ast.Attribute) and sub.attr == "g":
                    names.append(f"{sub.value.id}{GRAD_SUFFIX}")
                elif isinstance(sub, ast.Name):
                    names.append(sub.id)
        return names

    def walk(body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, ast.For):
                walk(stmt.body)
                walk(stmt.body)
                continue
            if not isinstance(stmt, (ast.Assign, ast.AugAssign)):
                continue
            used = read_in(stmt.value)
            if isinstance(stmt, ast.AugAssign) or any(
                isinstance(t, ast.Subscript) for t in getattr(stmt, "targets", [])
            ):  # an index or an in-place write reads its target's index too
                used |= read_in(stmt.targets[0].slice if isinstance(stmt, ast.Assign)
                                else stmt.target)  # fmt: skip
            for target in targets(stmt):
                tensor = grad_of(target)
                if tensor is not None:
                    reads.setdefault(tensor, set()).update(used - {tensor})
                else:
                    helpers[target] = helpers.get(target, set()) | used

    walk(list(plan.backward.body))
    return reads


# --------------------------------------------------------------------------- missing branch


def branch_parts(plan: Plan, main: Outcome, name: str) -> dict[str, torch.Tensor] | str | None:
    """What each forward line that reads `name` sends back to it: `{target: part}`, the parts
    autograd's gradient sums; a str says why there is no split."""
    lines = tensor_uses(plan, name)
    if len(lines) < 2:
        return None
    if len(lines) > MAX_PARTS:
        return f"{name} is read by {len(lines)} lines: more than {MAX_PARTS} to split"
    statements = {s.lineno: s for s in plan.forward.body}
    value = main.forward.get(name)
    if not isinstance(value, Traced) or not value.t.is_floating_point():
        return None
    parts: dict[str, torch.Tensor] = {}
    for line in lines:
        stmt = statements.get(line)
        if not isinstance(stmt, ast.Assign) or _draws(stmt):
            return f"line {line} cannot be evaluated again on its own"
        target = stmt.targets[0]
        outs = [e.id for e in target.elts] if isinstance(target, ast.Tuple) else (
            [target.id] if isinstance(target, ast.Name) else [])  # fmt: skip
        if not outs:
            return f"line {line} writes no name"
        part = _line_vjp(plan, main, stmt, name, outs)
        if isinstance(part, str):
            return part
        label = ", ".join(outs)
        parts[label] = part if label not in parts else parts[label] + part
    return parts


def _line_vjp(
    plan: Plan, main: Outcome, stmt: ast.Assign, name: str, outs: list[str]
) -> torch.Tensor | str:
    """d(this line's outputs)/d(name), the line's other names held fixed, applied to
    autograd's gradients of its outputs."""
    leaf = main.forward[name].t.detach().requires_grad_()
    scope = dict(main.forward)
    scope[name] = Traced(leaf, name)
    interp = ForwardRun(plan.forward, scope, lambda: None)
    try:
        with torch.enable_grad():
            made = interp.eval(stmt.value)
    except (FormulaError, RuntimeError, IndexError, ValueError, TypeError):
        return f"line {stmt.lineno} cannot be evaluated again on its own"
    values = list(made) if isinstance(made, (Pair, tuple)) else [made]
    outputs, grads = [], []
    for out, v in zip(outs, values):
        if isinstance(v, Traced) and v.t.requires_grad and out in main.autograd:
            outputs.append(v.t)
            grads.append(main.autograd[out].to(v.t.dtype))
    if not outputs:
        return torch.zeros_like(leaf)
    with torch.enable_grad():
        (part,) = torch.autograd.grad(outputs, [leaf], grads, allow_unused=True)
    return torch.zeros_like(leaf) if part is None else part.detach()


def _draws(stmt: ast.stmt) -> bool:
    for node in ast.walk(stmt):
        if isinstance(node, ast.Call):
            f = node.func
            called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if called in RANDOM_CALLS:
                return True
    return False


def _sizes(main: Outcome) -> tuple[int, ...]:
    """The sizes the program works with (every dim of its tensors, and its whole numbers)."""
    found: set[int] = set()
    for value in [*main.forward.values(), *main.inputs.values()]:
        t = value.t if isinstance(value, Traced) else value
        if isinstance(t, torch.Tensor):
            found |= {int(d) for d in t.shape}
        elif isinstance(t, int) and not isinstance(t, bool) and 1 < t <= 1 << 24:
            found.add(t)
    return tuple(sorted(d for d in found if d > 1))
