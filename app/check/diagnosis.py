"""Why a gradient is wrong: the diagnosis a teacher gives from the numbers.

The check says *whether* a written gradient `G` matches autograd's `R`; this module says *why*
not, by testing one hypothesis at a time, each a tensor `H` that the slip would have produced,
against `G` with the check's own tolerance (`close`):

    scale            H = c * R, c fitted by least squares, c > 0 and clearly not 1
    sign             H = -R
    transpose        H = R.mT (a square gradient)
    shape            G's shape is not R's, nor the same entries
    missing_branch   H = the sum of a proper subset of the parts R sums (one per forward
                     line that reads the tensor: `parts`)
    dropped_duplicates  G + (accumulated - one write per index) = R (`duplicates`)
    precision        |G - R| within float32's tolerance and float32's measured rounding
                     (`lower`: R computed in float32), in a float64 run
    upstream         a gradient the line reads already fails (decided by the caller)
    unknown          none of these

No false diagnoses: a gradient within tolerance gets none; the first hypothesis that explains
`G` names the slip, and a gradient wrong for two reasons at once (a sign and a factor, a
transpose and a sign) is explained by none, so it is `unknown`. Rounding never passes for a
scale: the fitted factor must explain `G` within tolerance *and* move it clearly away from R
(what is left after the factor is at most a quarter of what the factor changes).

Cost: scale, sign and transpose are a few passes over the gradient (float64 copies of G and
R); the other hypotheses run only when these fail and only under their bounds
(MAX_PARTS consumers, MAX_SUBSET_WORK elements compared in the subset search). The callers
build `parts`, `duplicates` and `lower` lazily, so a run pays for them only on a failing
gradient that needs them.

No web imports: the notebook and the exported script use it too. A program's exported
script embeds `explain`, `_scale` and `name_factor` (their source, as the run's file embeds
the reference), so it prints the same sentence for a scale, a sign or a transpose.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from app.check.tolerance import NOISE_FACTOR, compare

Close = Callable[[torch.Tensor, torch.Tensor], bool]

MAX_PARTS = 6  # consumers of one tensor split into parts: 2**6 - 2 subsets at most
MAX_SUBSET_WORK = 64 << 20  # elements compared over the whole subset search
MAX_DIAGNOSED_NUMEL = 16 << 20  # a gradient larger than this gets `unknown`, with the reason


@dataclass
class Evidence:
    """What the caller knows beyond G and R. The callables are called only when their
    hypothesis is reached; each returns None (or a reason, a str) when it cannot say."""

    spelled: str  # how the learner names the gradient: dbnmeani, w1.g
    upstream: str | None = None  # a gradient the line reads that is already wrong (spelled)
    upstream_tensor: str | None = None  # its tensor's name (the contract's `from`)
    sizes: tuple[int, ...] = ()  # the sizes the program uses, to name a factor (1/n, ...)
    parts: Callable[[], Mapping[str, torch.Tensor] | str | None] | None = None
    duplicates: Callable[[], torch.Tensor | None] | None = None  # accumulated - one write
    lower: Callable[[], torch.Tensor | str | None] | None = None  # R computed in float32
    lower_close: Close | None = None  # the float32 tolerance, for `precision`
    hint: str | None = None  # a hand-written hint: the better sentence where none fits
    extra: dict[str, Any] = field(default_factory=dict)


def diagnose(G: torch.Tensor, R: torch.Tensor, close: Close, ev: Evidence) -> dict[str, Any]:
    """The diagnosis of a gradient that failed the check: `{"kind", "message", ...}`."""
    if ev.upstream is not None:
        return {
            "kind": "upstream",
            "from": ev.upstream_tensor or ev.upstream,
            "message": f"{ev.spelled} is computed from {ev.upstream}, which is already wrong: "
            f"fix {ev.upstream} first (this line may be right)",
        }
    if tuple(G.shape) != tuple(R.shape):
        return _shape(G, R, ev)
    if not G.is_floating_point():
        return _unknown(ev, f"{ev.spelled} is an integer tensor: a gradient is float")
    if not (bool(torch.isfinite(G).all()) and bool(torch.isfinite(R).all())):
        return _unknown(ev, f"{ev.spelled} or autograd's gradient is not finite (inf or nan)")
    if G.numel() > MAX_DIAGNOSED_NUMEL:
        return _unknown(ev, f"{ev.spelled} has {G.numel():,} entries: too many to diagnose "
                        f"(at most {MAX_DIAGNOSED_NUMEL:,})", skipped=True)  # fmt: skip
    found = explain(G, R, close, ev.sizes, ev.spelled)
    if found is not None:
        return found
    for test in (_missing_branch, _dropped_duplicates, _precision):
        found = test(G, R, close, ev)
        if found is not None:
            return found
    if not bool(G.ne(0).any()):
        return _unknown(ev, f"{ev.spelled} is zero everywhere, autograd's is not: is a part of "
                        "the chain rule missing, or a mask that zeroes everything?")  # fmt: skip
    return _unknown(ev)


def explain(
    G: torch.Tensor, R: torch.Tensor, close: Close, sizes: tuple[int, ...], spelled: str
) -> dict[str, Any] | None:
    """The slips seen in G and R alone (same shape): a constant factor, the sign, a
    transpose. None when none of them explains G within `close`."""
    g, r = G.double().reshape(-1), R.double().reshape(-1)
    rr = float((r * r).sum())
    if rr > 0:
        c = float((g * r).sum()) / rr
        if abs(c + 1) > 1e-3 and c > 0:
            left = float((g - c * r).abs().max())  # what the factor does not explain
            moved = abs(c - 1) * float(r.abs().max())  # what the factor changes
            if left <= 0.25 * moved and close(G, (R.double() * c).to(R.dtype)):
                return _scale(c, sizes, spelled)
        if close(G, -R):
            return {"kind": "sign", "message": f"{spelled} is autograd's gradient with the "
                    "opposite sign: a minus sign lost or added (d(-x) = -dx; d(a - b) by b "
                    "is -1)?"}  # fmt: skip
    if G.dim() >= 2 and G.shape[-1] == G.shape[-2] and G.shape[-1] > 1:
        if close(G, R.transpose(-1, -2)):
            return {"kind": "transpose", "message": f"{spelled} is autograd's gradient "
                    "transposed: a square weight hides it from the shapes (for y = x @ W, "
                    "dW = x.T @ dy, not its transpose)"}  # fmt: skip
    return None


# a factor's name, its words, and what a teacher would ask about it
_FACTOR_STORIES = {
    "1/n": "a mean where the chain rule sums?",
    "n": "a sum where the forward takes a mean (a 1/n missing)?",
    "n/(n-1)": "Bessel's correction: the forward and the backward must divide by the same "
    "n - 1 (or n)",
    "(n-1)/n": "Bessel's correction: the forward and the backward must divide by the same "
    "n - 1 (or n)",
    "2": "a part counted twice, or a 2 that does not belong?",
    "1/2": "a 2 missing (d(x**2) = 2 * x * dx)?",
    "3": "a part counted three times?",
    "1/3": "a 3 missing?",
    "4": "a factor of 4 too many?",
    "1/4": "a 4 missing?",
}


def name_factor(
    c: float, sizes: tuple[int, ...], rel: float = 2e-4
) -> tuple[str, int | None] | None:
    """The known factor closest to c, within `rel`: ("1/n", 32), ("n/(n-1)", 32), ("2", None)
    ..., or None. The sizes are the program's (and their products by two: a mean over
    B * T)."""
    candidates: list[tuple[float, str, int | None]] = []
    for k in (2, 3, 4):
        candidates += [(float(k), str(k), None), (1.0 / k, f"1/{k}", None)]
    ns = {n for n in sizes if n > 1}
    ns |= {a * b for a, b in itertools.combinations(sorted(ns), 2) if a * b <= 1 << 24}
    for n in sorted(ns):
        candidates += [(float(n), "n", n), (1.0 / n, "1/n", n),
                       (n / (n - 1), "n/(n-1)", n), ((n - 1) / n, "(n-1)/n", n)]  # fmt: skip
    best = None
    for value, words, n in candidates:
        off = abs(c / value - 1)
        if off <= rel and (best is None or off < best[0]):
            best = (off, words, n)
    return (best[1], best[2]) if best else None


def _scale(c: float, sizes: tuple[int, ...], spelled: str) -> dict[str, Any]:
    named = name_factor(c, sizes)
    out: dict[str, Any] = {"kind": "scale", "factor": c}
    if named is None:
        out["message"] = (f"{spelled} is autograd's gradient times {c:.4g}, the same factor "
                          "everywhere: a constant is off (a mean, a count, a 2?)")  # fmt: skip
        return out
    words, n = named
    out["factor_words"] = words
    if n is not None:
        out["n"] = n
        amount = f"{words} (n = {n})"
    else:
        amount = words
    story = _FACTOR_STORIES.get(words, "")
    if words in ("2", "3", "4", "n"):
        out["message"] = f"{spelled} is {amount} times autograd's gradient: {story}"
    else:
        out["message"] = f"{spelled} is autograd's gradient times {amount}: {story}"
    return out


def _shape(G: torch.Tensor, R: torch.Tensor, ev: Evidence) -> dict[str, Any]:
    def fmt(s: tuple) -> str:
        return "(" + ", ".join(map(str, s)) + ("," if len(s) == 1 else "") + ")"

    message = (f"{ev.spelled} is {fmt(tuple(G.shape))} but the tensor is {fmt(tuple(R.shape))}: "
               "a gradient has its tensor's shape")  # fmt: skip
    if G.is_floating_point() and G.numel() <= MAX_DIAGNOSED_NUMEL:
        if G.dim() == 2 and tuple(G.shape) == tuple(R.shape)[::-1] and _near(G.mT, R):
            message += "; its numbers are autograd's, transposed"
        else:
            summed = _sum_to(G, tuple(R.shape))
            if summed is not None and _near(summed, R):
                message += ("; summed over the broadcast dims it is autograd's (the adjoint of "
                            "broadcasting is a sum)")  # fmt: skip
    if ev.hint:
        message += f". {ev.hint}"
    return {"kind": "shape", "message": message}


def _sum_to(G: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """G summed down to `shape` when G's shape is `shape` broadcast, else None."""
    try:
        if torch.broadcast_shapes(tuple(G.shape), shape) != tuple(G.shape):
            return None
    except RuntimeError:
        return None
    lead = G.dim() - len(shape)
    out = G.sum(tuple(range(lead))) if lead else G
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and out.shape[i] != 1)
    return out.sum(dims, keepdim=True) if dims else out


def _near(a: torch.Tensor, b: torch.Tensor) -> bool:
    """A loose closeness, only to add a remark to a shape's message (not a verdict)."""
    if tuple(a.shape) != tuple(b.shape):
        return False
    scale = float(b.double().abs().max()) if b.numel() else 0.0
    return bool(((a.double() - b.double()).abs() <= 1e-4 * scale + 1e-12).all())


def _missing_branch(G, R, close: Close, ev: Evidence) -> dict[str, Any] | None:
    if ev.parts is None:
        return None
    parts = ev.parts()
    if not isinstance(parts, Mapping) or len(parts) < 2:
        return None
    if len(parts) > MAX_PARTS or G.numel() * (2 ** len(parts)) > MAX_SUBSET_WORK:
        ev.extra["skipped"] = f"{len(parts)} parts of {G.numel():,} entries: too many to try"
        return None
    labels = list(parts)
    tensors = [parts[k].double() for k in labels]
    if not close(torch.stack(tensors).sum(0).to(R.dtype), R):
        return None  # the parts do not add up to autograd's: no split to reason with
    for size in range(len(labels) - 1, 0, -1):  # the fewest missing parts first
        for kept in itertools.combinations(range(len(labels)), size):
            H = torch.stack([tensors[i] for i in kept]).sum(0).to(R.dtype)
            if close(G, H):
                missing = [labels[i] for i in range(len(labels)) if i not in kept]
                has = [labels[i] for i in kept]
                return {
                    "kind": "missing_branch",
                    "missing": missing,
                    "message": f"{ev.spelled} has the part through {_and(has)} but not the "
                    f"part through {_and(missing)}: the tensor is used by {len(labels)} "
                    f"forward lines, and its gradient is the sum of what each use sends back "
                    f"(accumulate with +=)",
                }
    return None


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _dropped_duplicates(G, R, close: Close, ev: Evidence) -> dict[str, Any] | None:
    if ev.duplicates is None:
        return None
    delta = ev.duplicates()
    if delta is None or tuple(delta.shape) != tuple(G.shape):
        return None
    if close((G.double() + delta.double()).to(R.dtype), R):
        return {
            "kind": "dropped_duplicates",
            "message": f"{ev.spelled} keeps one write per repeated index: `t[ids] += v` with "
            "an id that repeats adds only one of its v's (PyTorch's indexed write). "
            "Accumulate every one: index_add_, or a loop over the ids",
        }
    return None


def _precision(G, R, close: Close, ev: Evidence) -> dict[str, Any] | None:
    if ev.lower is None or R.dtype != torch.float64 or ev.lower_close is None:
        return None
    if not ev.lower_close(G.float(), R.float()):
        return None  # wrong beyond float32's own tolerance: not a question of precision
    lower = ev.lower()
    if not isinstance(lower, torch.Tensor) or tuple(lower.shape) != tuple(R.shape):
        return None
    rounding = float((lower.double() - R).abs().max())  # float32's rounding, measured
    err = float((G.double() - R).abs().max())
    if rounding > 0 and err <= NOISE_FACTOR * rounding:
        return {
            "kind": "precision",
            "message": f"{ev.spelled} matches autograd only as closely as float32 does (error "
            f"{err:.1e}; the whole network in float32 is {rounding:.1e} off): a .float() or a "
            "float32 tensor inside the float64 run?",
        }
    return None


def _unknown(ev: Evidence, why: str | None = None, skipped: bool = False) -> dict[str, Any]:
    message = (
        why
        or ev.hint
        or (
            f"{ev.spelled} differs from autograd's gradient in a way no single slip explains (not "
            "a constant factor, the sign, a transpose, a missing part): perhaps two at once; "
            "compare its formula with the chain rule step by step"
        )
    )
    out: dict[str, Any] = {"kind": "unknown", "message": message}
    if skipped or "skipped" in ev.extra:
        out["skipped"] = why if skipped else ev.extra["skipped"]
    return out


# --------------------------------------------------------------------------- a run's check


def diagnose_check(
    check: dict[str, Any],
    manual: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    reads: Mapping[str, set[str]],
    sizes: tuple[int, ...] = (),
    floors: Mapping[str, float] | None = None,
    lower: Callable[[], Mapping[str, torch.Tensor] | None] | None = None,
) -> dict[str, Any]:
    """`diagnosis` on every entry of a run's check (`tensors` and `intermediates`, keyed
    `w1`, `out:fused`): null where it passes. `reference`: autograd's gradients by tensor
    name; `reads`: the gradients each gradient's formula reads (upstream); the tolerance is
    the check's own (app/check/autograd.py's `compare`, its floor and noise); `lower`:
    autograd's gradients in float32, for a float64 run's `precision`."""
    floors = floors or {}
    sections = [check[k] for k in ("tensors", "intermediates") if k in check]
    verdict = {k.split(":")[0]: r["allclose"] for sec in sections for k, r in sec.items()
               if ":" not in k}  # fmt: skip
    cached: dict[str, Any] = {}

    def lower_grads() -> Mapping[str, torch.Tensor]:
        if "lower" not in cached:
            cached["lower"] = (lower() if lower is not None else None) or {}
        return cached["lower"]

    for section in sections:
        for key, result in section.items():
            result["diagnosis"] = None
            name = key.split(":")[0]
            if result["allclose"] or key not in manual or name not in reference:
                continue
            up = next((d for d in sorted(reads.get(key, reads.get(name, ())))
                       if d != name and verdict.get(d) is False), None)  # fmt: skip
            noise, floor = result.get("rounding_noise", 0.0), floors.get(key, 0.0)

            def close(g, h, noise=noise, floor=floor) -> bool:
                return bool(compare(g.to(h.dtype), h, floor, noise)["allclose"])

            ev = Evidence(
                spelled=f"{key}.g" if ":" not in key else key,
                upstream=f"{up}.g" if up else None,
                upstream_tensor=up,
                sizes=sizes,
                lower=lambda name=name: lower_grads().get(name),
                lower_close=lambda a, b: bool(compare(a, b)["allclose"]),
            )
            result["diagnosis"] = diagnose(manual[key], reference[name], close, ev)
    link_roots(sections, lambda n: f"{n}.g")
    return check


def link_roots(sections: list[Mapping[str, Any]], spell: Callable[[str], str]) -> None:
    """An upstream diagnosis names, beside the gradient it reads (`from`), the first wrong
    one on its path (`root`): the one to fix."""
    rows = {k: r for sec in sections for k, r in sec.items()}
    for row in rows.values():
        d = row.get("diagnosis")
        if not d or d["kind"] != "upstream":
            continue
        seen, at = set(), d["from"]
        while at in rows and at not in seen:
            seen.add(at)
            nxt = rows[at].get("diagnosis")
            if not nxt or nxt["kind"] != "upstream":
                break
            at = nxt["from"]
        if at != d["from"]:
            d["root"] = at
            root_spelled = spell(at)
            d["message"] = d["message"].replace(
                "(this line may be right)",
                f"(this line may be right; the first wrong gradient on its path is {root_spelled})",
            )


# --------------------------------------------------------------------------- replays


def one_write_delta(shape: tuple[int, ...], key: Any, update: torch.Tensor) -> torch.Tensor:
    """What `t[key] += update` loses to PyTorch's one write per index: the accumulated sum
    (index_put with accumulate=True) minus what the indexed write keeps, on a zero `t`. The
    base cancels, so this is the correction whatever `t` held before; zero when no index
    repeats."""
    zeros = torch.zeros(shape, dtype=update.dtype)
    kept = zeros.clone()
    piece = kept[key]
    piece.add_(update)
    kept[key] = piece  # as Python runs `t[key] += update`: one write per index
    keys = key if isinstance(key, tuple) else (key,)
    full = zeros.index_put(keys, update.expand_as(piece).clone(), accumulate=True)
    return full - kept


def has_repeats(key: Any) -> bool:
    """Whether an advanced index writes some position twice (integer index tensors; a slice
    or a mask never repeats one)."""
    if not isinstance(key, tuple) and (not isinstance(key, torch.Tensor) or key.numel() <= 1):
        return False  # one index of one position (an embedding loop's `dC[Xb[k, j]] += ...`)
    keys = key if isinstance(key, tuple) else (key,)
    tensors = [k for k in keys if isinstance(k, torch.Tensor) and not k.is_floating_point()
               and k.dtype != torch.bool]  # fmt: skip
    if all(t.numel() <= 1 for t in tensors):
        # one position (an embedding loop's `dC[Xb[k, j]] += ...`): no repeat. (Indices that
        # broadcast together pick more than one position only if one of them has more than
        # one entry; torch.broadcast_shapes costs ~10 us, once per loop iteration here.)
        return False
    if math.prod(torch.broadcast_shapes(*(t.shape for t in tensors))) <= 1:
        return False
    rows = torch.stack([t.reshape(-1) for t in torch.broadcast_tensors(*tensors)], 1)
    return rows.shape[0] > 1 and torch.unique(rows, dim=0).shape[0] < rows.shape[0]


# --------------------------------------------------------------------------- the message


def shown_message(row: Mapping[str, Any]) -> str | None:
    """The one sentence a failing row shows: the diagnosis, or the hand-written hint where
    the diagnosis knows nothing better (`unknown` takes the hint as its message already)."""
    diagnosis = row.get("diagnosis")
    if diagnosis:
        return diagnosis["message"]
    return row.get("hint")
