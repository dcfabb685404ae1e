"""Follow one element of a written gradient back to the terms that made it (POST /api/program's
`follow`): the learner's backward is run again, over the forward's values, and every statement
that writes the followed gradient is taken apart just before it runs. The answer is the last
statement that wrote the element and the terms of its last reduction:

    A @ B                 the products A[..., i, k] * B[..., k, j], one per k
    E.sum(dims)           the entries of E over the reduced dims
    G.index_add_(d, ids, S)   G's value before, and S's row for every repeat of the id
    G.scatter_add_(d, idx, S) G's value before, and every S entry scattered onto the element
    F.fold(cols, ...)     the entries of every overlapping window that lands on the element
    a + b, a - b          the terms of each side (a side without a reduction is one term)
    c * E, E / c          E's terms scaled, for a plain number c
    E.view / reshape / .T / transpose / clone     E's terms at the element's place in E
    G += E                G's value before, then E's terms
    anything else         one term: the element, with the value of every tensor it reads at
                          the element's place (a masked attention position: p is 0 there)

Every term's `value` is the number it adds; `sum` and `terms_total` cover them all, and `sum`
equals the element's value up to rounding.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from app.lab.parse import source_segment
from app.ops.cancel import RunCancelled
from app.ops.making import Maker
from app.ops.traced import Traced
from app.programs.plan import GRAD_PREFIX, BackwardRun, Plan

MAX_TERMS = 4096
AUG = {ast.Add: 1.0, ast.Sub: -1.0}
SCATTERS = ("index_add_", "scatter_add_")
SHAPE_ONLY = ("view", "reshape", "contiguous", "clone", "view_as", "reshape_as")


@dataclass
class Group:
    """Terms of one kind: their values (a 1-D float64 tensor) and how to describe the j-th."""

    values: torch.Tensor
    describe: Callable[[int], tuple[dict[str, list[int]], dict[str, float]]]

    def scaled(self, c: float) -> Group:
        return Group(self.values * c, self.describe)


class FollowRun(BackwardRun):
    """The backward, watching every statement that writes one gradient's element."""

    def __init__(self, plan: Plan, env: dict[str, Any], check: Callable[[], None],
                 maker: Maker | None, tensor: str, index: tuple[int, ...]):  # fmt: skip
        super().__init__(plan.backward, env, set(plan.has_grad), check, maker=maker)
        self.tensor, self.final = tensor, index
        self.flat = 0  # the element's place in row-major order: the same through a view
        self.index = index
        self.found: tuple[ast.stmt, list[Group] | None] | None = None

    # ---- which statements write the gradient

    def _f_writes(self, stmt: ast.stmt) -> ast.expr | None:
        """The target expression if `stmt` may write the followed gradient."""
        if isinstance(stmt, ast.Assign):
            target = stmt.targets[0]
        elif isinstance(stmt, ast.AugAssign):
            target = stmt.target
        elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
            func = stmt.value.func
            target = func.value if isinstance(func, ast.Attribute) else None
        else:
            return None
        base = target.value if isinstance(target, ast.Subscript) else target
        name = _name_of(base)
        return target if name is not None and self.grad_of(name) == self.tensor else None

    def _statement(self, stmt: ast.stmt) -> None:
        target = self._f_writes(stmt)
        if target is None or _reshapes(stmt, target):  # `dr = dr.view(...)`: the same numbers
            super()._statement(stmt)
            return
        self.index = self._f_place()
        if self.index is None and isinstance(stmt, ast.Assign) and isinstance(target, ast.Name):
            value = self._f_value(stmt.value)
            if isinstance(value, torch.Tensor) and value.numel() > self.flat:
                self.index = _unravel(self.flat, tuple(value.shape))
        if self.index is None:
            super()._statement(stmt)
            return
        try:
            groups = self._f_statement_terms(stmt, target)
        except RunCancelled:
            raise
        except Exception:  # a form this module does not take apart: one term, after the run
            groups = None
        super()._statement(stmt)
        if groups is not False:
            self.found = (stmt, groups)

    # ---- the element's place

    def _f_place(self) -> tuple[int, ...] | None:
        """The element's index in the gradient as it is now (a view of another shape, before
        a later `.view` rebinds it), or None when it does not exist yet."""
        cur = self._f_current()
        if cur is None or cur.numel() <= self.flat:
            return None
        return _unravel(self.flat, tuple(cur.shape))

    def _f_current(self) -> torch.Tensor | None:
        g = self.gradients.get(self.tensor)
        return None if g is None else g.t

    def _f_before(self) -> list[Group]:
        """The element's value before the statement: the first term of an accumulation."""
        cur = self._f_current()
        value = float(cur[self.index]) if cur is not None else 0.0
        name = f"{self.spelling.get(self.tensor, GRAD_PREFIX + self.tensor)} (before)"
        return [Group(torch.tensor([value], dtype=torch.float64),
                      lambda j: ({name: list(self.index)}, {name: value}))]  # fmt: skip

    def _f_statement_terms(self, stmt: ast.stmt, target: ast.expr) -> list[Group] | bool | None:
        """The terms the statement adds into the element; False when it does not write it."""
        if isinstance(stmt, ast.Expr):
            call = stmt.value
            method = call.func.attr
            if method in SCATTERS:
                return self._f_scatter(call, method)
            return None
        if isinstance(target, ast.Subscript):
            at = self._f_place_in_write(target)
            if at is None:
                return False
        else:
            at = self.index
        if isinstance(stmt, ast.AugAssign):
            sign = AUG.get(type(stmt.op))
            if sign is None:
                return None
            return self._f_before() + [g.scaled(sign) for g in self._f_terms(stmt.value, at)]
        return self._f_terms(stmt.value, at)

    def _f_place_in_write(self, target: ast.Subscript) -> tuple[int, ...] | None:
        """Where the element sits in the value an indexed write stores (None: not written)."""
        cur = self._f_current()
        if cur is None:
            return None
        positions = torch.arange(cur.numel()).view(cur.shape)
        saved = self.gradients[self.tensor]
        self.gradients[self.tensor] = Traced(positions, saved.expr)
        try:
            picked = self.eval(target).t
        finally:
            self.gradients[self.tensor] = saved
        flat = sum(i * s for i, s in zip(self.index, positions.stride()))
        hits = (picked == flat).nonzero()
        if not len(hits):
            return None
        return tuple(int(i) for i in hits[-1])  # repeated ids: the last write stands

    # ---- terms of an expression at an index of its value

    def _f_value(self, node: ast.expr) -> Any:
        value = self.eval(node)
        return value.t if isinstance(value, Traced) else value

    def _f_terms(self, node: ast.expr, at: tuple[int, ...]) -> list[Group]:
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.MatMult):
                return self._f_matmul(node, at)
            if isinstance(node.op, (ast.Add, ast.Sub)):
                sign = 1.0 if isinstance(node.op, ast.Add) else -1.0
                return self._f_side(node.left, at) + [g.scaled(sign) for g in
                                                    self._f_side(node.right, at)]  # fmt: skip
            if isinstance(node.op, (ast.Mult, ast.Div)):
                left, right = self._f_value(node.left), self._f_value(node.right)
                if _is_number(right) and isinstance(left, torch.Tensor):
                    c = float(right) if isinstance(node.op, ast.Mult) else 1.0 / float(right)
                    return [g.scaled(c) for g in self._f_side(node.left, at)]
                if (
                    _is_number(left)
                    and isinstance(right, torch.Tensor)
                    and isinstance(node.op, ast.Mult)
                ):
                    return [g.scaled(float(left)) for g in self._f_side(node.right, at)]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return [g.scaled(-1.0) for g in self._f_terms(node.operand, at)]
        if isinstance(node, ast.Attribute) and node.attr == "T":
            return self._f_terms(node.value, tuple(reversed(at)))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            method, receiver = node.func.attr, node.func.value
            if method == "sum" and isinstance(self._f_value(receiver), torch.Tensor):
                return self._f_sum(node, receiver, at)
            if method in SHAPE_ONLY:
                inner = self._f_value(receiver)
                if isinstance(inner, torch.Tensor):
                    out = self._f_value(node)
                    flat = sum(i * s for i, s in zip(at, _strides(tuple(out.shape))))
                    return self._f_terms(receiver, _unravel(flat, tuple(inner.shape)))
            if method == "transpose" and len(node.args) == 2:
                a, b = (self._f_value(x) for x in node.args)
                inner = self._f_value(receiver)
                a, b = a % inner.dim(), b % inner.dim()
                where = list(at)
                where[a], where[b] = where[b], where[a]
                return self._f_terms(receiver, tuple(where))
            if method == "fold" and _is_functional(node.func):
                return self._f_fold(node, at)
        return [self._f_leaf(node, at)]

    def _f_side(self, node: ast.expr, at: tuple[int, ...]) -> list[Group]:
        """One side of a sum: its terms at the element's place (broadcast), or a number."""
        value = self._f_value(node)
        if not isinstance(value, torch.Tensor):
            v = float(value)
            seg = source_segment(self.source, node)
            return [Group(torch.tensor([v], dtype=torch.float64), lambda j: ({}, {seg: v}))]
        return self._f_terms(node, _broadcast_index(at, tuple(value.shape)))

    def _f_leaf(self, node: ast.expr, at: tuple[int, ...]) -> Group:
        """One term: the expression's value at `at`, with every tensor it reads there."""
        value = self._f_value(node)
        number = float(value[at]) if isinstance(value, torch.Tensor) else float(value)
        index: dict[str, list[int]] = {}
        factors: dict[str, float] = {}
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ()
        for sub in ast.walk(node):
            name = _name_of(sub)
            if name is None or name in factors:
                continue
            try:
                t = self._f_value(sub)
            except Exception:
                continue
            if not isinstance(t, torch.Tensor) or t.dim() > len(shape):
                continue
            try:
                where = _broadcast_index(at, tuple(t.shape))
                factors[name] = float(t[where])
            except (IndexError, RuntimeError):
                continue
            index[name] = list(where)
        return Group(torch.tensor([number], dtype=torch.float64), lambda j: (index, factors))

    def _f_matmul(self, node: ast.BinOp, at: tuple[int, ...]) -> list[Group]:
        a, b = self._f_value(node.left), self._f_value(node.right)
        if a.dim() < 2 or b.dim() < 2:
            return [self._f_leaf(node, at)]
        batch = at[:-2]
        i, j = at[-2], at[-1]
        a_at = _broadcast_index(batch, tuple(a.shape[:-2]))
        b_at = _broadcast_index(batch, tuple(b.shape[:-2]))
        row = a[a_at][i].double()
        col = b[b_at][:, j].double()
        sa, sb = source_segment(self.source, node.left), source_segment(self.source, node.right)
        if sa == sb:
            sb += " (right)"

        def describe(k: int):
            return ({sa: [*a_at, i, k], sb: [*b_at, k, j]},
                    {sa: float(row[k]), sb: float(col[k])})  # fmt: skip

        return [Group(row * col, describe)]

    def _f_sum(self, node: ast.Call, receiver: ast.expr, at: tuple[int, ...]) -> list[Group]:
        e = self._f_value(receiver)
        args = [self._f_value(x) for x in node.args]
        kw = {k.arg: self._f_value(k.value) for k in node.keywords}
        dims = kw.get("dim", args[0] if args else None)
        keepdim = kw.get("keepdim", kw.get("keepdims", args[1] if len(args) > 1 else False))
        if dims is None:
            dims = tuple(range(e.dim()))
        elif isinstance(dims, int):
            dims = (dims,)
        dims = sorted(d % e.dim() for d in dims)
        kept = iter(at)
        where: list[Any] = []
        for d in range(e.dim()):
            if d in dims:
                where.append(slice(None))
                if keepdim:
                    next(kept)
            else:
                where.append(next(kept))
        picked = e[tuple(where)].double().reshape(-1)
        reduced = tuple(e.shape[d] for d in dims)
        seg = source_segment(self.source, receiver)

        def describe(k: int):
            full = list(where)
            for d, v in zip(dims, _unravel(k, reduced)):
                full[d] = v
            return {seg: full}, {seg: float(picked[k])}

        return [Group(picked, describe)]

    def _f_scatter(self, call: ast.Call, method: str) -> list[Group] | bool:
        dim, ids, src = (self._f_value(x) for x in call.args[:3])
        dim = dim % len(self.index)
        seg = source_segment(self.source, call.args[2])
        at = self.index
        if method == "index_add_":
            rows = (ids.reshape(-1) == at[dim]).nonzero().reshape(-1)
            if not len(rows):
                return False
            picked = torch.stack([src[(*at[:dim], int(r), *at[dim + 1 :])] for r in rows])

            def describe(k: int):
                where = [*at[:dim], int(rows[k]), *at[dim + 1 :]]
                return {seg: where}, {seg: float(picked[k])}
        else:  # scatter_add_: out[..., idx[..., j, ...], ...] += src[..., j, ...]
            where = tuple(slice(None) if d == dim else at[d] for d in range(ids.dim()))
            rows = (ids[where] == at[dim]).nonzero().reshape(-1)
            if not len(rows):
                return False
            picked = src[where][rows]

            def describe(k: int):
                full = [int(rows[k]) if d == dim else at[d] for d in range(ids.dim())]
                return {seg: full}, {seg: float(picked[k])}

        return self._f_before() + [Group(picked.double(), describe)]

    def _f_fold(self, node: ast.Call, at: tuple[int, ...]) -> list[Group]:
        cols = self._f_value(node.args[0])
        names = ("output_size", "kernel_size", "dilation", "padding", "stride")
        given = dict(zip(names, (self._f_value(x) for x in node.args[1:])))
        given.update({k.arg: self._f_value(k.value) for k in node.keywords})
        size = _pair(given["output_size"])
        kernel = _pair(given["kernel_size"])
        opts = {k: given[k] for k in ("dilation", "padding", "stride") if k in given}
        # which window entries land on each pixel: unfold an image of pixel numbers (1-based)
        ids = torch.arange(1, size[0] * size[1] + 1, dtype=torch.float64).view(1, 1, *size)
        places = F.unfold(ids, kernel, **opts)[0]  # (kh*kw, L)
        batched = len(at) == 4
        n, c, y, x = at if batched else (None, *at)
        hits = (places == y * size[1] + x + 1).nonzero()
        kk = kernel[0] * kernel[1]
        rows = [c * kk + int(h[0]) for h in hits]
        ls = [int(h[1]) for h in hits]
        src = cols[n] if batched else cols
        picked = torch.stack([src[r, col] for r, col in zip(rows, ls)]).double() if rows else (
            torch.zeros(0, dtype=torch.float64))  # fmt: skip
        seg = source_segment(self.source, node.args[0])

        def describe(k: int):
            where = [rows[k], ls[k]] if not batched else [n, rows[k], ls[k]]
            return {seg: where}, {seg: float(picked[k])}

        return [Group(picked, describe)]


def _reshapes(stmt: ast.stmt, target: ast.expr) -> bool:
    """`dr = dr.view(...)`: the gradient rebound as a view of itself writes no new numbers."""
    if not isinstance(stmt, ast.Assign) or not isinstance(target, ast.Name):
        return False
    node = stmt.value
    while (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and (node.func.attr in SHAPE_ONLY)
    ):
        node = node.func.value
    return node is not stmt.value and isinstance(node, ast.Name) and node.id == target.id


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_functional(func: ast.Attribute) -> bool:
    return isinstance(func.value, ast.Name) and func.value.id == "F"


def _name_of(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name) and node.id not in ("torch", "F", "math"):
        return node.id
    if isinstance(node, ast.Attribute) and node.attr == "g" and isinstance(node.value, ast.Name):
        return f"{node.value.id}.g"
    return None


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _strides(shape: tuple[int, ...]) -> list[int]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= s
    return list(reversed(out))


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for s in reversed(shape):
        out.append(flat % s)
        flat //= s
    return tuple(reversed(out))


def _broadcast_index(at: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """`at` (an index into a broadcast result) as an index into an operand of `shape`."""
    tail = at[len(at) - len(shape) :] if shape else ()
    return tuple(0 if s == 1 else i for i, s in zip(tail, shape))


def follow(plan: Plan, env: dict[str, Any], manual: dict[str, torch.Tensor], maker: Maker | None,
           tensor: str, index: tuple[int, ...], check: Callable[[], None]) -> dict[str, Any]:  # fmt: skip
    """The contract's `follow` for element `index` of `tensor`'s written gradient."""
    run = FollowRun(plan, env, check, maker, tensor, index)
    run.flat = sum(i * s for i, s in zip(index, _strides(tuple(manual[tensor].shape))))
    with torch.no_grad():
        try:
            run.run()
        except RunCancelled:
            raise
        except Exception:  # the backward stops where the real run stopped: follow up to there
            pass
    value = float(manual[tensor][index])
    grad = run.spelling.get(tensor, GRAD_PREFIX + tensor)
    out: dict[str, Any] = {"grad": grad, "index": list(index), "value": value, "line": None,
                           "code": None, "terms": [], "sum": value, "terms_total": 0}  # fmt: skip
    if run.found is None:
        return out
    stmt, groups = run.found
    if groups is None:  # a form not taken apart: the element as one term
        groups = [Group(torch.tensor([value], dtype=torch.float64),
                        lambda j: ({grad: list(index)}, {grad: value}))]  # fmt: skip
    terms: list[dict[str, Any]] = []
    for group in groups:
        for k in range(min(len(group.values), MAX_TERMS - len(terms))):
            where, factors = group.describe(k)
            terms.append({"index": where, "factors": factors, "value": float(group.values[k])})
    total = sum(float(g.values.sum()) for g in groups)
    out.update(line=stmt.lineno, code=plan.backward.code(stmt), terms=terms,
               sum=total if math.isfinite(total) else None,
               terms_total=sum(len(g.values) for g in groups))  # fmt: skip
    return out
