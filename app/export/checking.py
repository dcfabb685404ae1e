"""The file's witness: the reference forward (app/check/reference.py's own source), autograd on
fresh leaves, and the check table with its rounding recheck, as app/check/autograd.py checks."""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.check import reference, tolerance
from app.check.recheck import RECHECK_MAX_BYTES
from app.engine.tensors import input_specs
from app.export import frames
from app.export.lines import framed, module_body

# --------------------------------------------------------------------------- the reference


# The reference's functions, in the order a reader meets them; the file carries their source.
REFERENCE_FUNCTIONS = (
    reference.linear,
    reference.normalize,
    reference.activation,
    reference.loss_of,
    reference.forward,
    reference.forward_keeping,
    reference.forward_from,
    reference._stage,
)


def reference_statements(cfg) -> list[str]:
    """The reference forward, app/check/reference.py's own source (`inspect.getsource`), so
    the file's autograd differentiates the very functions Broadprop's check does; then what
    they read of the run's config; `forward_keeping` keeps every intermediate whose gradient
    the API checks (`retain_grad`), as app/check/autograd.py's `reference_loss` does."""
    lines = [
        f"NORM_EPS = {reference.NORM_EPS!r}",
        f"REFERENCE_LEAKY_SLOPE = {reference.REFERENCE_LEAKY_SLOPE!r}",
    ]
    for function in REFERENCE_FUNCTIONS:
        lines += ["", "", *inspect.getsource(function).rstrip("\n").split("\n")]
    network = {
        "hidden": list(cfg.hidden),
        "norm": cfg.norm,
        "activation": cfg.activation,
        "loss": cfg.loss,
        "out_features": cfg.out_features,
    }
    fields = ", ".join(f"{name}={json.dumps(value)}" for name, value in network.items())
    return [
        *lines,
        "",
        "",
        f"cfg = SimpleNamespace({fields})  # what the reference reads of the run's config",
    ]


def kept_names(cfg) -> list[str]:
    """The intermediates whose gradients the check compares too (as app/check/autograd.py keeps)."""
    names = ["out"]
    for k in range(1, len(cfg.hidden) + 1):
        names += [f"l{k}", *([f"n{k}"] if cfg.norm != "none" else []), f"a{k}"]
    return names


def autograd_statements(cfg) -> list[str]:
    names = ["x", *(s.name for s in input_specs(cfg) if s.role == "param")]
    lines = ["leaves = {  # fresh leaves: the same numbers, none of the history above"]
    lines += [f'    "{n}": {n}.detach().requires_grad_(),' for n in names]
    lines += [
        "}",
        "keep = {}  # out and each l{k}, n{k}, a{k}, whose gradients are checked too",
        'forward_keeping(cfg, {**leaves, "target": target}, keep).backward()',
    ]
    return lines


# --------------------------------------------------------------------------- the check


@dataclass
class Checked:
    name: str  # as in the API's check: "w1", "out", "out:fused"
    manual: str  # the expression holding the manual gradient
    floor: str = "0.0"  # atol's scale floor (a gradient that cancels to ~0)


def check_statements(
    cfg, checks: list[Checked], manual_pass: list[str], script: bool, recheck: bool
) -> list[str]:
    """The check as app/check/autograd.py makes it: allclose per gradient (app/check/
    tolerance.py's own code, embedded), then, for a failed one, the rounding recheck (the same
    formulas and autograd again in the other precision) where Broadprop's rule gives the run
    one (`recheck`, app/check/recheck.py: the file carries the verdict, it does not weigh
    again)."""
    names = [s.name for s in input_specs(cfg)]
    lines = [
        "# the tolerance, Broadprop's own app/check/tolerance.py: every entry within",
        "# atol + rtol * |autograd|, atol = atol_scale * max|autograd| (abs() on both sides,",
        "# which the article's is_same forgot; NaN never passes), never below NOISE_FACTOR",
        "# times the rounding both sides carry, measured by the recheck",
        *module_body(tolerance),
        "",
        "",
        f"RECHECK = {recheck}  # Broadprop's rule: "
        + ("this run is small enough (at most " if recheck else "this run is over ")
        + f"{RECHECK_MAX_BYTES >> 20} MiB of tensors and gradients) to rerun a failing check",
        "",
        "",
        *framed(
            frames.manual_gradients,
            TENSORS=", ".join(names),
            MANUAL_PASS=manual_pass,
            GRADIENTS="{\n" + "".join(f'    "{c.name}": {c.manual},\n' for c in checks) + "}",
        ),
        "",
        "",
        "manual = {",
        *(f'    "{c.name}": {c.manual},' for c in checks),
        "}",
        "autograd = {n: t.grad for n, t in [*leaves.items(), *keep.items()]}",
        "results = {",
        '    key: compare(m, autograd[key.split(":")[0]], atol_floor=floors.get(key, 0.0))',
        "    for key, m in manual.items()",
        "}",
        "noise = {}",
        'if RECHECK and not all(r["allclose"] for r in results.values()):',
        "    # Where a gradient cancels to ~0 (a norm over 1 or 2 features or rows), both sides",
        "    # are rounding noise. Run both again in the other precision: rounding moves, a wrong",
        "    # formula does not. noise = |autograd - autograd'| + |manual - manual'|.",
        "    other = torch.float64 if x.dtype == torch.float32 else torch.float32",
        "    cast = {",
        "        n: t.to(other) if t.is_floating_point() else t",
        f"        for n, t in dict({', '.join(f'{n}={n}' for n in names)}).items()",
        "    }",
        '    leaves_o = {n: t.detach().requires_grad_() for n, t in cast.items() if n != "target"}',
        "    keep_o = {}",
        '    forward_keeping(cfg, {**leaves_o, "target": cast["target"]}, keep_o).backward()',
        "    autograd_o = {n: t.grad for n, t in [*leaves_o.items(), *keep_o.items()]}",
        "    manual_o = manual_gradients(**cast)",
        "    for key, result in results.items():",
        '        name = key.split(":")[0]',
        "        pairs = [(autograd[name], autograd_o[name]), (manual[key], manual_o[key])]",
        '        if result["allclose"] or not all(torch.isfinite(t).all() for p in pairs for t in p):',
        "            continue",
        "        noise[key] = noise_between(pairs)",
        "        floor = floors.get(key, 0.0)",
        "        results[key] = compare(manual[key], autograd[name], floor, noise[key])",
        "",
        'differ = [key for key, result in results.items() if not result["allclose"]]',
        "print(f\"{'gradient':<12}{'shape':<20}{'max_abs_err':>12}{'max_rel_err':>12}  allclose\")",
        "for key, result in results.items():",
        '    err, rel, ok = result["max_abs_err"], result["max_rel_err"], result["allclose"]',
        "    shape = str(tuple(manual[key].shape))",
        "    # the recheck's allowance, said so that a failure never reads as if it were noise",
        "    note = (",
        '        f"  (rounding noise {noise[key]:.1e} allowed: "',
        '        + ("within it)" if ok else "still beyond it, so the formula is wrong)")',
        '        if key in noise else ""',
        "    )",
        '    print(f"{key:<12}{shape:<20}{err:>12.3e}{rel:>12.3e}  {ok}{note}")',
    ]
    floors = [c for c in checks if c.floor != "0.0"]
    if floors:
        comment = [
            "# before a batchnorm, b{k}.g sums l{k}.g over the batch, which is 0 in exact",
            "# arithmetic: both sides are rounding noise, so atol scales with the terms summed",
        ]
        body = [f'    "{c.name}": {c.floor},' for c in floors]
        lines[lines.index("manual = {") : lines.index("manual = {")] = [
            *comment,
            "floors = {",
            *body,
            "}",
        ]
    else:
        lines.insert(lines.index("manual = {"), "floors = {}  # atol floors: none in this run")
    if script:
        lines += [
            "if differ:",
            '    print("differ from autograd:", ", ".join(differ))',
            "    sys.exit(1)",
            'print("every gradient matches autograd")',
        ]
    else:
        lines += [
            'assert not differ, "differ from autograd: " + ", ".join(differ)',
            'print("every gradient matches autograd")',
        ]
    return lines


def _cancelling_floor(cfg, name: str) -> str:
    """Before a batchnorm, b{k}.g sums l{k}.g over the batch, which is 0 in exact arithmetic:
    atol scales with the terms summed instead (as app/check/autograd.py's `cancelling_scale`)."""
    k = name[1:]
    if cfg.norm != "batchnorm" or name[0] != "b" or not k.isdigit() or int(k) > len(cfg.hidden):
        return "0.0"
    return f'keep["l{k}"].grad.abs().reshape(-1, {cfg.hidden[int(k) - 1]}).sum(0).max().item()'


def checked_gradients(cfg, backward: Sequence[dict[str, Any]]) -> list[Checked]:
    """What the API's check compares, in its order: every leaf (x and the parameters, as they
    were made), then the kept intermediates, each with its variant formulas."""

    def checked(entry: dict[str, Any], floor: str = "0.0") -> Checked:
        grad, variant = entry["grad"], entry.get("variant")
        if variant:
            return Checked(f"{grad}:{variant}", f"{grad}_g_{variant}")
        return Checked(grad, f"{grad}.g", floor)

    checks = []
    for spec in input_specs(cfg):
        for entry in (e for e in backward if e["grad"] == spec.name):
            checks.append(checked(entry, _cancelling_floor(cfg, spec.name)))
    kept = set(kept_names(cfg))
    checks += [checked(entry) for entry in backward if entry["grad"] in kept]
    return checks
