"""What went wrong with a formula's shapes, said the way a teacher would: both operands
right-aligned with the clashing dim, and a hint from a catalogue of the classic mistakes.

The catalogue is patterns, not a chat: each hint is a function of the shapes alone, tried in
order; the first that fits is shown. Every message names the expressions and their shapes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from app.ops.broadcast import BroadcastError, BroadcastRule, broadcast_rule

Shape = tuple[int, ...]


def fmt_shape(shape: Sequence[int]) -> str:
    """As the article writes shapes: (1000, 784, 50); (5,) for one dim."""
    return f"({shape[0]},)" if len(shape) == 1 else "(" + ", ".join(map(str, shape)) + ")"


def aligned_table(exprs: Sequence[str], shapes: Sequence[Shape]) -> str:
    """The operands' shapes right-aligned, dim under dim, as broadcasting reads them."""
    ndim = max((len(s) for s in shapes), default=0)
    cells = [["" for _ in range(ndim - len(s))] + [str(d) for d in s] for s in shapes]
    widths = [max(len(row[i]) for row in cells) for i in range(ndim)]
    name_width = max(len(e) for e in exprs)
    lines = []
    for expr, row in zip(exprs, cells):
        dims = "  ".join(c.rjust(w) for c, w in zip(row, widths))
        lines.append(f"  {expr.ljust(name_width)}  [ {dims} ]")
    return "\n".join(lines)


def _fits(a: Shape, b: Shape) -> BroadcastRule | None:
    try:
        return broadcast_rule(a, b)
    except BroadcastError:
        return None


def _unsqueeze_fix(expr: str, shape: Shape, other: Shape) -> tuple[str, Shape] | None:
    """The first `expr.unsqueeze(d)` that makes `shape` broadcast with `other`, preferring
    positions that pair every entry of one with every entry of the other."""
    for d in range(1, len(shape) + 1):
        new = shape[:d] + (1,) + shape[d:]
        if _fits(new, other):
            return f"{expr}.unsqueeze({d if d < len(shape) else -1})", new
    return None


def broadcast_clash(symbol: str, exprs: Sequence[str], shapes: Sequence[Shape], err) -> str:
    """`l1.g * w1`: (8, 4) and (6, 4) clash at dim -2 (8 vs 6); ...hint; then the table."""
    (ea, eb), (sa, sb) = exprs, shapes
    head = (
        f"{fmt_shape(sa)} and {fmt_shape(sb)} do not broadcast: they clash at dim {err.dim} "
        f"({err.a} vs {err.b})"
    )
    hint = _broadcast_hint(ea, eb, sa, sb)
    table = aligned_table([ea, eb], [sa, sb])
    return f"{head}{'; ' + hint if hint else ''}\n{table}"


def _broadcast_hint(ea: str, eb: str, sa: Shape, sb: Shape) -> str:
    # the article's x.g: rows of one against rows of the other, sharing the last dim
    if len(sa) == len(sb) == 2 and sa[-1] == sb[-1] and sa[0] != sb[0]:
        return (
            f"to pair every row of {ea} with every row of {eb}, give {ea} its own dim: "
            f"`{ea}.unsqueeze(1)`, making {fmt_shape((sa[0], 1, sa[1]))} against "
            f"{fmt_shape(sb)} -> {fmt_shape((sa[0], sb[0], sa[1]))}"
        )
    # the article's w.g: per row, every column of one against every column of the other
    if len(sa) == len(sb) == 2 and sa[0] == sb[0] and sa[1] != sb[1]:
        return (
            f"to pair, row by row, every column of {ea} with every column of {eb}, give {ea} "
            f"a trailing dim and {eb} a middle one: `{ea}.unsqueeze(-1) * {eb}.unsqueeze(1)` "
            f"-> {fmt_shape((sa[0], sa[1], sb[1]))}, then sum over the rows"
        )
    # a transposed operand
    if len(sb) == 2 and _fits(sa, sb[::-1]):
        return f"{eb} looks transposed: `{_transposed(eb)}` is {fmt_shape(sb[::-1])}"
    if len(sa) == 2 and _fits(sa[::-1], sb):
        return f"{ea} looks transposed: `{_transposed(ea)}` is {fmt_shape(sa[::-1])}"
    # a missing size-1 dim on one side
    for expr, shape, other in ((ea, sa, sb), (eb, sb, sa)):
        fix = _unsqueeze_fix(expr, shape, other)
        if fix is not None:
            return f"a size-1 dim on {expr} would line them up: `{fix[0]}` is {fmt_shape(fix[1])}"
    return (
        "sizes must be equal or one of them 1, compared from the right; "
        "unsqueeze, transpose or sum one side until they line up"
    )


def _transposed(expr: str) -> str:
    """`w1` -> `w1.T`; `w1.T` -> `w1` (never `w1.T.T`)."""
    return expr[:-2] if expr.endswith(".T") else f"{expr}.T"


def matmul_problem(sa: Shape, sb: Shape) -> str | None:
    """Why `a @ b` cannot run, or None."""
    if not sa or not sb:
        return "@ needs tensors of at least 1 dim"
    inner_a = sa[-1]
    inner_b = sb[-2] if len(sb) >= 2 else sb[0]
    if inner_a != inner_b:
        return f"the inner dims differ: {inner_a} (last of the left) vs {inner_b}"
    if len(sa) > 2 and len(sb) > 2 and not _fits(sa[:-2], sb[:-2]):
        return "their batch dims do not broadcast"
    return None


def matmul_clash(exprs: Sequence[str], shapes: Sequence[Shape], problem: str) -> str:
    (ea, eb), (sa, sb) = exprs, shapes
    head = f"{fmt_shape(sa)} @ {fmt_shape(sb)}: {problem}"
    hint = ""
    if len(sb) == 2 and not matmul_problem(sa, sb[::-1]):
        hint = f"; `{ea} @ {_transposed(eb)}` is {fmt_shape((*sa[:-1], sb[0]))}"
    elif len(sa) == 2 and not matmul_problem(sa[::-1], sb):
        hint = f"; `{_transposed(ea)} @ {eb}` is {fmt_shape((sa[1], *sb[1:]))}"
    elif len(sa) == 2 and len(sb) == 2 and sa[0] == sb[0]:
        hint = f"; to sum over their shared first dim, `{_transposed(ea)} @ {eb}`"
    return f"{head}{hint}\n{aligned_table([ea, eb], [sa, sb])}"


def result_shape(
    key: str, made: Shape, wanted: Shape, broadcasts: Sequence[dict], of: str | None = None
) -> str:
    """The result is `made`, the gradient must be `wanted`: say so, and how to get there.
    `key`: the gradient as written (`x.g`, `db1`); `of`: its tensor (`x` of `x.g` by default);
    `broadcasts`: the line's steps (a reduction over the wrong dim is named too)."""
    of = of or key.removesuffix(".g")
    head = f"{key} must have {of}'s shape {fmt_shape(wanted)}, but the formula gives " + (
        "a scalar ()" if not made else fmt_shape(made)
    )
    hint = _result_hint(made, wanted, broadcasts)
    return f"{head}{'; ' + hint if hint else ''}"


def _result_hint(made: Shape, wanted: Shape, broadcasts: Sequence[dict]) -> str:
    if not made:
        return "a .sum() or .mean() with no dim reduced everything: give it the dim to reduce"
    if len(made) == 2 and made[::-1] == wanted:
        return "it is transposed: add `.T`"
    if made == (*wanted, 1):
        return "a size-1 dim is left at the end: `.squeeze(-1)`, or sum without keepdim"
    if made == (1, *wanted):
        return "keepdim=True left a size-1 dim in front: drop keepdim, or `.squeeze(0)`"
    if wanted == (*made, 1):
        return (
            "it lacks the size-1 dim at the end: `.unsqueeze(-1)` (the article's mse gradient "
            "ends so, to give out's (N, 1) back)"
        )
    extra = len(made) - len(wanted)
    if extra > 0:
        # sum away dims so that what is left is `wanted`, in order
        for dims in _dim_choices(len(made), extra):
            kept = tuple(s for i, s in enumerate(made) if i not in dims)
            if kept == wanted:
                shown = tuple(d - len(made) if d == len(made) - 1 else d for d in dims)
                dim_text = str(shown[0]) if len(shown) == 1 else str(shown)
                why = (
                    " (a broadcast over the batch: the gradient sums over it)" if 0 in dims else ""
                )
                return f"sum away what the broadcast added: `.sum({dim_text})`{why}"
    for step in broadcasts:
        hint = _wrong_reduction(step, wanted)
        if hint:
            return hint
    outer = [b for b in broadcasts if _stretched_both(b)]
    if outer and math.prod(made) > math.prod(wanted):
        step = outer[0]
        return (
            f"`{step['expr']}` stretched both operands ({fmt_shape(step['inputs'][0])} and "
            f"{fmt_shape(step['inputs'][1])} -> {fmt_shape(step['output'])}): a (N,) meeting "
            "a (N, 1) gives (N, N); squeeze or unsqueeze one side so they match"
        )
    return ""


def _wrong_reduction(step: dict, wanted: Shape) -> str:
    """A sum over the wrong dims: `x.sum(1)` of a (32, 64) where (64,) is wanted."""
    if step.get("action") != "reduce" or not step.get("inputs") or not step.get("reduced_dims"):
        return ""
    source = tuple(step["inputs"][0])
    done = tuple(d % len(source) for d in step["reduced_dims"]) if source else ()
    for dims in _dim_choices(len(source), len(source) - len(wanted)):
        kept = tuple(s for i, s in enumerate(source) if i not in dims)
        if kept == wanted and dims != done:
            dim_text = str(dims[0]) if len(dims) == 1 else str(dims)
            why = " (the batch dim: a bias's gradient sums over the batch)" if dims == (0,) else ""
            op = step.get("op") or "sum"
            return f"`{step['expr']}` reduces the wrong dim of {fmt_shape(source)}: `.{op}({dim_text})`{why}"
    return ""


def _dim_choices(ndim: int, count: int) -> list[tuple[int, ...]]:
    from itertools import combinations

    return list(combinations(range(ndim), count))


def _stretched_both(step: dict) -> bool:
    rule = step.get("broadcast")
    return bool(rule and rule["a"]["expanded"] and rule["b"]["expanded"])


# "Traced.sum() missing 1 required positional argument: 'self'": Python's words for a call with
# too few or too many arguments, naming our own functions
_ARGUMENT_ERROR = re.compile(r"^[\w.<>]+\(\) ((?:missing|takes|got) .*)$")


def torch_error_line(err: BaseException) -> str:
    """The first line of an error torch (or a call's arguments) raised, in the learner's terms:
    a call with the wrong arguments says so without naming Broadprop's own functions."""
    first = (str(err).strip() or type(err).__name__).splitlines()[0]
    wrong = _ARGUMENT_ERROR.match(first) if isinstance(err, TypeError) else None
    if wrong is None:
        return first
    said = wrong.group(1).replace("'self'", "the tensor").replace("positional ", "")
    return f"the call's arguments do not fit its PyTorch signature: {said}"
