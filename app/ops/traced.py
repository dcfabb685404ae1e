"""`Traced`: a tensor paired with the Python expression that made it.

Each operation on a `Traced` runs the real torch op and appends one trace step (action,
expression, input shapes, output shape, bytes). Run on meta tensors it gives the whole trace
from shape arithmetic alone, allocating nothing; run on real tensors it computes. The formula
an op writes once is therefore both the computation and the text the API shows.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from app.ops import scratch
from app.ops.broadcast import Shape, broadcast_rule
from app.ops.cancel import check_cancelled
from app.ops.copies import blas_copy_bytes
from app.ops.meta_index import meta_index, meta_masked
from app.ops.precision import single_precision

# Operator precedence, for parenthesizing generated expressions the way a person would.
ADD, MUL, UNARY, ATOM = 1, 2, 3, 4


@dataclass
class Step:
    """One traced operation: what it did, the expression so far, and the shapes in and out."""

    action: str  # unsqueeze, squeeze, reshape, broadcast, elementwise, scale, mask, reduce, ...
    op: str  # the torch operation: mul, sum, unsqueeze, gt, ...
    expr: str
    inputs: list[Shape]
    output: Shape
    bytes: int
    detail: dict[str, Any] = field(default_factory=dict)  # e.g. the broadcast rule, reduced dims
    seq: int = field(default_factory=lambda: next(_SEQ))  # creation order = execution order

    def as_dict(self) -> dict[str, Any]:
        out = {
            "action": self.action,
            "op": self.op,
            "expr": self.expr,
            "inputs": [list(s) for s in self.inputs],
            "output": list(self.output),
            "bytes": self.bytes,
        }
        out.update(self.detail)
        return out


def _fmt_scalar(value: float | int | bool) -> str:
    """As Python reads it back to the same number and type: a float keeps its `.0` (`bool *
    1.0` is a float, `* 1` an int) and its sign (`-0.0`); inf and nan as float('inf')."""
    if isinstance(value, bool) or isinstance(value, int):
        return repr(value)
    value = float(value)
    return repr(value) if math.isfinite(value) else f"float('{value!r}')"


_SEQ = itertools.count()
_NONE: Any = ()  # a value's steps and bindings when it has none

COMPARISONS = {"gt": ">", "lt": "<", "ge": ">=", "le": "<=", "eq": "==", "ne": "!="}


def _is_basic_index(part: Any) -> bool:
    return part is None or part is Ellipsis or isinstance(part, (int, slice))


def _fmt_index(part: Any) -> str:
    if part is None:
        return "None"
    if part is Ellipsis:
        return "..."
    if isinstance(part, slice):
        pieces = ["" if v is None else str(v) for v in (part.start, part.stop, part.step)]
        return ":".join(pieces[:2]) + (f":{pieces[2]}" if part.step is not None else "")
    return str(part)


def _merge_steps(*sources: Sequence[Any]) -> list[Any]:
    """Merge step (or binding) lists in the order they ran, each shared item once."""
    nonempty = [steps for steps in sources if steps]
    if len(nonempty) <= 1 or all(steps is nonempty[0] for steps in nonempty):
        return list(nonempty[0]) if nonempty else []  # each list is merged already
    seen: set[int] = set()
    merged: list[Any] = []
    for steps in sources:
        for step in steps:
            if id(step) not in seen:
                seen.add(id(step))
                merged.append(step)
    merged.sort(key=lambda item: item.seq)
    return merged


@dataclass(eq=False)
class Binding:
    """`name = expr`: a named intermediate, so a long formula reads as short statements."""

    name: str
    expr: str
    seq: int = field(default_factory=lambda: next(_SEQ))

    def line(self) -> str:
        return f"{self.name} = {self.expr}"


class Traced:
    """A tensor with the expression that made it and the trace steps that led to it.

    Every method runs the torch operation of the same name on `.t`, so a formula written
    with `Traced` operands reads exactly like the article's code. `named` gives an
    intermediate a short name; `bindings` are then the statements that define the names an
    expression uses, in order (`code()` writes them out as runnable Python).
    """

    __slots__ = ("t", "expr", "prec", "steps", "bindings")

    def __init__(
        self,
        t: torch.Tensor,
        expr: str,
        prec: int = ATOM,
        steps: list[Step] | None = None,
        bindings: list[Binding] | None = None,
    ):
        self.t = t
        self.expr = expr
        self.prec = prec
        # none: one shared empty tuple, not two new lists (a real run makes hundreds of
        # values with neither; nothing appends to a value's lists, a tuple could not be)
        self.steps = steps or _NONE
        self.bindings = bindings or _NONE

    # ---- plumbing

    @classmethod
    def leaf(cls, t: torch.Tensor, name: str) -> Traced:
        return cls(t, name)

    def named(self, name: str, grad_of: Traced | None = None) -> Traced:
        """This value under a short name (`counts`, `xhat.g`): later expressions use the name,
        and the step that made it is tagged `"name": name` in the trace. A gradient named
        `xhat.g` passes `grad_of=xhat`, so the code defines `xhat` before setting `xhat.g`."""
        if self.steps:
            self.steps[-1].detail.setdefault("name", name)
        steps, bindings = self.steps, self.bindings
        if grad_of is not None:
            steps = _merge_steps(grad_of.steps, steps)
            bindings = _merge_steps(grad_of.bindings, bindings)
        binding = Binding(name, self.expr)
        return Traced(self.t, name, ATOM, list(steps), [*bindings, binding])

    def code(self, target: str) -> str:
        """Runnable Python: the bindings this value uses, then `target = expr`."""
        return "\n".join([*(b.line() for b in self.bindings), f"{target} = {self.expr}"])

    @property
    def shape(self) -> Shape:
        return tuple(self.t.shape)

    @property
    def ndim(self) -> int:
        return self.t.ndim

    def _wrapped(self, min_prec: int) -> str:
        return f"({self.expr})" if self.prec < min_prec else self.expr

    def _make(
        self,
        t: torch.Tensor,
        expr: str,
        prec: int,
        action: str,
        op: str,
        operands: Sequence[Traced],
        detail: dict[str, Any] | None = None,
    ) -> Traced:
        return made(t, expr, action, op, operands, detail, prec)

    def _method(self, t: torch.Tensor, call: str, action: str, op: str, **detail: Any) -> Traced:
        return self._make(t, f"{self._wrapped(ATOM)}.{call}", ATOM, action, op, [self], detail)

    # ---- shape ops

    def unsqueeze(self, dim: int) -> Traced:
        return self._method(self.t.unsqueeze(dim), f"unsqueeze({dim})", "unsqueeze", "unsqueeze")

    def squeeze(self, dim: int | None = None) -> Traced:
        if dim is None:
            return self._method(self.t.squeeze(), "squeeze()", "squeeze", "squeeze")
        return self._method(self.t.squeeze(dim), f"squeeze({dim})", "squeeze", "squeeze")

    def view(self, *shape: int) -> Traced:
        args = ", ".join(map(str, shape))
        return self._method(self.t.view(shape), f"view({args})", "reshape", "view")

    def transpose(self, dim0: int, dim1: int) -> Traced:
        t = self.t.transpose(dim0, dim1)
        return self._method(t, f"transpose({dim0}, {dim1})", "reshape", "transpose")

    def permute(self, *dims: int) -> Traced:
        args = ", ".join(map(str, dims))
        return self._method(self.t.permute(dims), f"permute({args})", "reshape", "permute")

    def transpose2d(self) -> Traced:  # `.t()`; the name `t` holds the tensor itself
        if self.ndim > 2:
            raise ValueError(f".t() expects a tensor of at most 2 dims, got {self.ndim}")
        return self._method(self.t.t(), "t()", "reshape", "t")

    @property
    def T(self) -> Traced:  # noqa: N802 (torch's name)
        if self.ndim != 2:
            raise ValueError(f".T expects a 2-D tensor here, got {self.ndim} dims")
        return self._make(self.t.T, f"{self._wrapped(ATOM)}.T", ATOM, "reshape", "T", [self])

    def expand(self, *sizes: int) -> Traced:
        """A stretched view: no memory, but whatever reads it does the full work."""
        args = ", ".join(map(str, sizes))
        t = self.t.expand(*sizes)
        return self._method(t, f"expand({args})", "broadcast", "expand", view=True)

    def reshape(self, *shape: int) -> Traced:
        args = ", ".join(map(str, shape))
        t = self.t.reshape(shape)
        # reshape copies when no view can give the shape (a transposed or stretched operand):
        # then it is a new tensor, and its bytes count
        action = "reshape" if not t.is_meta or t._is_view() else "copy"
        return self._method(t, f"reshape({args})", action, "reshape")

    # ---- reductions

    def _reduce(self, op: str, dim: int | tuple[int, ...], keepdim: bool) -> Traced:
        t = getattr(self.t, op)(dim, keepdim=keepdim)
        if op in ("max", "min"):
            t = t.values
        args = f"{dim}, keepdim=True" if keepdim else f"{dim}"
        call = f"{op}({args})" + (".values" if op in ("max", "min") else "")
        dims = [dim] if isinstance(dim, int) else list(dim)
        # a 0-d tensor takes dim 0 or -1 (torch's meaning) and reduces nothing
        dims = [d % self.ndim for d in dims] if self.ndim else []
        return self._method(t, call, "reduce", op, reduced_dims=dims)

    def sum(self, dim: int | tuple[int, ...] | None = None, keepdim: bool = False) -> Traced:
        if dim is None:  # the sum of everything: a scalar
            return self._method(
                self.t.sum(), "sum()", "reduce", "sum", reduced_dims=list(range(self.ndim))
            )
        return self._reduce("sum", dim, keepdim)

    def mean(self, dim: int | tuple[int, ...] | None = None, keepdim: bool = False) -> Traced:
        if dim is None:  # the mean of everything: a scalar
            return self._method(
                self.t.mean(), "mean()", "reduce", "mean", reduced_dims=list(range(self.ndim))
            )
        return self._reduce("mean", dim, keepdim)

    def amax(self, dim: int | tuple[int, ...], keepdim: bool = False) -> Traced:
        return self._reduce("max" if isinstance(dim, int) else "amax", dim, keepdim)

    def amin(self, dim: int | tuple[int, ...], keepdim: bool = False) -> Traced:
        return self._reduce("min" if isinstance(dim, int) else "amin", dim, keepdim)

    def max(self, dim: int | None = None, keepdim: bool = False) -> Traced:
        """With a dim, the values (as `.max(dim).values`); without, the largest entry."""
        if dim is None:
            return self._method(self.t.max(), "max()", "reduce", "max")
        return self._reduce("max", dim, keepdim)

    def min(self, dim: int | None = None, keepdim: bool = False) -> Traced:
        if dim is None:
            return self._method(self.t.min(), "min()", "reduce", "min")
        return self._reduce("min", dim, keepdim)

    def softmax(self, dim: int) -> Traced:
        t = self.t.softmax(dim)
        return self._method(t, f"softmax({dim})", "elementwise", "softmax", **self._dense())

    def log_softmax(self, dim: int) -> Traced:
        t = self.t.log_softmax(dim)
        return self._method(t, f"log_softmax({dim})", "elementwise", "log_softmax", **self._dense())

    def _dense(self) -> dict[str, int]:
        """torch's CPU softmax reads a contiguous input: a transposed or stretched one is
        copied first (measured: softmax of x.t() takes x's size again), so count it."""
        if not self.t.is_meta or self.t.is_contiguous():
            return {}
        return {"temp_bytes": self.t.numel() * self.t.element_size()}

    # ---- elementwise

    def _binary(
        self, other: Traced | float, symbol: str, op: str, prec: int, reverse: bool = False
    ) -> Traced:
        if isinstance(other, Traced):
            lhs, rhs = (other, self) if reverse else (self, other)
            if op == "mul" and lhs.t.shape != rhs.t.shape:
                # a chunked backward's product goes to its thread's reused buffer (scratch.py)
                t = scratch.multiply(lhs.t, rhs.t)
            else:
                t = getattr(torch, op)(lhs.t, rhs.t)
            expr = f"{lhs._wrapped(prec)} {symbol} {rhs._wrapped(prec + 1)}"
            detail: dict[str, Any] = {}
            if lhs.t.shape != rhs.t.shape:
                if t.is_meta:  # the rule is for the trace only
                    detail["broadcast"] = broadcast_rule(lhs.shape, rhs.shape).as_dict()
                action = "broadcast"
            else:
                action = "elementwise"
            return self._make(t, expr, prec, action, op, [lhs, rhs], detail)
        scalar = _fmt_scalar(other)
        if reverse:
            t = getattr(torch, op)(torch.as_tensor(other, dtype=self.t.dtype), self.t)
            expr = f"{scalar} {symbol} {self._wrapped(prec + 1)}"
        else:
            t = getattr(torch, op)(self.t, other)
            expr = f"{self._wrapped(prec)} {symbol} {scalar}"
        return self._make(t, expr, prec, "scale", op, [self])

    def __mul__(self, other: Traced | float) -> Traced:
        return self._binary(other, "*", "mul", MUL)

    def __rmul__(self, other: float) -> Traced:
        return self._binary(other, "*", "mul", MUL, reverse=True)

    def __truediv__(self, other: Traced | float) -> Traced:
        return self._binary(other, "/", "div", MUL)

    def __rtruediv__(self, other: float) -> Traced:
        return self._binary(other, "/", "div", MUL, reverse=True)

    def __add__(self, other: Traced | float) -> Traced:
        return self._binary(other, "+", "add", ADD)

    def __radd__(self, other: float) -> Traced:
        return self._binary(other, "+", "add", ADD, reverse=True)

    def __sub__(self, other: Traced | float) -> Traced:
        return self._binary(other, "-", "sub", ADD)

    def __rsub__(self, other: float) -> Traced:
        return self._binary(other, "-", "sub", ADD, reverse=True)

    def __neg__(self) -> Traced:
        return self._make(-self.t, f"-{self._wrapped(UNARY)}", UNARY, "elementwise", "neg", [self])

    def __matmul__(self, other: Traced) -> Traced:
        t = self.t @ other.t
        expr = f"{self._wrapped(MUL)} @ {other._wrapped(MUL + 1)}"
        detail = {}
        if t.is_meta:
            copies = [blas_copy_bytes(o.t) for o in (self, other)]
            if t.ndim > 2:  # batched: operands stretched over the batch are copied
                batch = t.shape[:-2]
                copies += [
                    math.prod(batch) * math.prod(o.shape[-2:]) * o.t.element_size()
                    for o in (self, other)
                    if o.ndim >= 2 and tuple(o.shape[:-2]) != tuple(batch)
                ]
            if sum(copies):
                detail["temp_bytes"] = sum(copies)
        return self._make(t, expr, MUL, "matmul", "matmul", [self, other], detail)

    def __gt__(self, other: float) -> Traced:  # type: ignore[override]
        return self.compare("gt", other)

    def compare(self, op: str, other: Traced | float) -> Traced:
        """`self > other` (op gt, lt, ge, le, eq, ne) as a mask; `other` may broadcast."""
        symbol = COMPARISONS[op]
        if isinstance(other, Traced):
            detail = {}
            if self.shape != other.shape and self.t.is_meta:
                detail["broadcast"] = broadcast_rule(self.shape, other.shape).as_dict()
            t = getattr(torch, op)(self.t, other.t)
            expr = f"{self._wrapped(ADD)} {symbol} {other._wrapped(ADD)}"
            return self._make(t, expr, 0, "mask", op, [self, other], detail)
        t = getattr(torch, op)(self.t, other)
        expr = f"{self._wrapped(ADD)} {symbol} {_fmt_scalar(other)}"
        return self._make(t, expr, 0, "mask", op, [self])

    def eq(self, other: Traced) -> Traced:
        """`self == other` as a mask (broadcasting), e.g. where a row's max is."""
        detail = {}
        if self.shape != other.shape:
            detail["broadcast"] = broadcast_rule(self.shape, other.shape).as_dict()
        return self._make(
            self.t == other.t,
            f"{self.expr} == {other.expr}",
            0,
            "mask",
            "eq",
            [self, other],
            detail,
        )

    def __getitem__(self, index: Any) -> Traced:
        """Basic indexing only (ints, slices, None, ...): a view, traced as `index`."""
        parts = index if isinstance(index, tuple) else (index,)
        shown = []
        for p in parts:
            if type(p) is not int:  # (an int is the common case: a loop's index)
                if not _is_basic_index(p):
                    raise TypeError("only ints, slices, None and ... can index a tensor here")
                p = _fmt_index(p)
            shown.append(str(p))
        text = ", ".join(shown) if parts else "()"
        expr = f"{self._wrapped(ATOM)}[{text}]"
        return made(self.t[index], expr, "index", "getitem", (self,))

    def __pow__(self, exponent: float) -> Traced:
        t = self.t.pow(exponent)
        expr = f"{self._wrapped(ATOM)} ** {_fmt_scalar(exponent)}"
        return self._make(t, expr, UNARY, "elementwise", "pow", [self])

    def pow(self, exponent: float) -> Traced:
        return self._method(
            self.t.pow(exponent), f"pow({_fmt_scalar(exponent)})", "elementwise", "pow"
        )

    def exp(self) -> Traced:
        return self._method(self.t.exp(), "exp()", "elementwise", "exp")

    def log(self) -> Traced:
        return self._method(self.t.log(), "log()", "elementwise", "log")

    def sqrt(self) -> Traced:
        return self._method(self.t.sqrt(), "sqrt()", "elementwise", "sqrt")

    def rsqrt(self) -> Traced:
        return self._method(self.t.rsqrt(), "rsqrt()", "elementwise", "rsqrt")

    def tanh(self) -> Traced:
        return self._method(self.t.tanh(), "tanh()", "elementwise", "tanh")

    def sigmoid(self) -> Traced:
        return self._method(self.t.sigmoid(), "sigmoid()", "elementwise", "sigmoid")

    def abs(self) -> Traced:
        return self._method(self.t.abs(), "abs()", "elementwise", "abs")

    def clamp(self, min: float | None = None, max: float | None = None) -> Traced:  # noqa: A002
        args = ", ".join(
            f"{k}={_fmt_scalar(v)}" for k, v in (("min", min), ("max", max)) if v is not None
        )
        return self._method(self.t.clamp(min, max), f"clamp({args})", "elementwise", "clamp")

    def clamp_max(self, high: float) -> Traced:
        return self._method(
            self.t.clamp_max(high), f"clamp_max({_fmt_scalar(high)})", "elementwise", "clamp_max"
        )

    def double(self) -> Traced:
        return self._method(self.t.double(), "double()", "elementwise", "double")

    def clamp_min(self, low: float) -> Traced:
        return self._method(
            self.t.clamp_min(low), f"clamp_min({_fmt_scalar(low)})", "elementwise", "clamp_min"
        )

    def float(self) -> Traced:
        """`.float()` as in the article; a mask becomes 0./1. (exact in every dtype)."""
        return self._method(self.t.to(single_precision()), "float()", "mask", "float")

    def to_dtype_of(self, other: Traced) -> Traced:
        return self.to(other.t.dtype)

    def to(self, dtype: torch.dtype) -> Traced:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(".to() takes torch.float32 or torch.float64")
        name = str(dtype).removeprefix("torch.")
        made = single_precision() if dtype == torch.float32 else dtype
        return self._method(self.t.to(made), f"to(torch.{name})", "mask", "to")

    def gather(self, dim: int, index: Traced) -> Traced:
        t = self.t.gather(dim, index.t)
        expr = f"{self._wrapped(ATOM)}.gather({dim}, {index.expr})"
        return self._make(t, expr, ATOM, "index", "gather", [self, index])

    # ---- what course notebooks write (the program mode; the formula lab takes them too)

    def index_with(self, parts: tuple[Any, ...]) -> Traced:
        """Indexing with tensors too (`C[Xb]`, `logprobs[range(n), Yb]`, `dh[h <= 0]`), as
        torch does it: integer tensors pick entries (a copy), a bool mask picks where it holds.
        `parts` are ints, slices, None, ... and `Traced` index tensors."""
        raw = tuple(meta_index(p.t) if isinstance(p, Traced) else p for p in parts)
        index = raw[0] if len(raw) == 1 else raw
        masks = [p for p in raw if isinstance(p, torch.Tensor) and p.dtype == torch.bool]
        if self.t.is_meta and masks:
            t = meta_masked(self.t, raw)
        else:
            t = self.t[index]
        text = ", ".join(p.expr if isinstance(p, Traced) else _fmt_index(p) for p in parts)
        operands = [self, *(p for p in parts if isinstance(p, Traced))]
        advanced = any(isinstance(p, Traced) for p in parts)
        expr = f"{self._wrapped(ATOM)}[{text}]"
        op = "index_select" if advanced else "getitem"
        return self._make(t, expr, ATOM, "index", op, operands)

    def max_pair(self, dim: int, keepdim: bool = False) -> tuple[Traced, Traced]:
        """`x.max(dim)`: (values, indices), as torch returns them."""
        return self._pair("max", dim, keepdim)

    def min_pair(self, dim: int, keepdim: bool = False) -> tuple[Traced, Traced]:
        return self._pair("min", dim, keepdim)

    def _pair(self, op: str, dim: int, keepdim: bool) -> tuple[Traced, Traced]:
        values, indices = getattr(self.t, op)(dim, keepdim=keepdim)
        args = f"{dim}, keepdim=True" if keepdim else f"{dim}"
        base = f"{self._wrapped(ATOM)}.{op}({args})"
        dims = [dim % self.ndim] if self.ndim else []
        return (
            self._make(values, f"{base}.values", ATOM, "reduce", op, [self], {"reduced_dims": dims}),
            self._make(indices, f"{base}.indices", ATOM, "reduce", f"arg{op}", [self],
                       {"reduced_dims": dims}),
        )  # fmt: skip

    def var(self, dim: Any = None, keepdim: bool = False, correction: float = 1) -> Traced:
        """`x.var(dim, keepdim, correction=)`: divides by n - correction (Bessel: 1)."""
        return self._spread("var", dim, keepdim, correction)

    def std(self, dim: Any = None, keepdim: bool = False, correction: float = 1) -> Traced:
        return self._spread("std", dim, keepdim, correction)

    def _spread(self, op: str, dim: Any, keepdim: bool, correction: float) -> Traced:
        t = getattr(self.t, op)(dim, keepdim=keepdim, correction=correction)
        args = [] if dim is None else [str(dim)]
        if keepdim:
            args.append("keepdim=True")
        if correction != 1:
            args.append(f"correction={_fmt_scalar(correction)}")
        dims = list(range(self.ndim)) if dim is None else [dim] if isinstance(dim, int) else dim
        dims = [d % self.ndim for d in dims] if self.ndim else []
        return self._method(t, f"{op}({', '.join(args)})", "reduce", op, reduced_dims=dims)

    def clone(self) -> Traced:
        return self._method(self.t.clone(), "clone()", "copy", "clone")

    def relu(self) -> Traced:
        return self._method(self.t.relu(), "relu()", "elementwise", "relu")

    def index_add(self, dim: int, index: Traced, source: Traced, alpha: float = 1) -> Traced:
        """`x.index_add(dim, index, source)`: a copy of x with source's slices added at
        `index` along `dim`, repeated indices accumulating (the embedding's gradient)."""
        t = self.t.index_add(dim, index.t, source.t, alpha=alpha)
        extra = "" if alpha == 1 else f", alpha={_fmt_scalar(alpha)}"
        expr = f"{self._wrapped(ATOM)}.index_add({dim}, {index.expr}, {source.expr}{extra})"
        return self._make(t, expr, ATOM, "index", "index_add", [self, index, source])

    def maximum(self, other: Traced) -> Traced:
        t = torch.maximum(self.t, other.t)
        return self._make(t, f"torch.maximum({self.expr}, {other.expr})", ATOM, "elementwise",
                          "maximum", [self, other])  # fmt: skip

    def minimum(self, other: Traced) -> Traced:
        t = torch.minimum(self.t, other.t)
        return self._make(t, f"torch.minimum({self.expr}, {other.expr})", ATOM, "elementwise",
                          "minimum", [self, other])  # fmt: skip


def made(
    t: torch.Tensor,
    expr: str,
    action: str,
    op: str,
    operands: Sequence[Traced] = (),
    detail: dict[str, Any] | None = None,
    prec: int = ATOM,
) -> Traced:
    """A new value and its one trace step (on meta tensors; real ones need no steps), from
    any operands, or none (`torch.zeros(3, 4)`)."""
    if not t.is_meta:  # computing, not tracing: the numbers need no steps
        check_cancelled()  # a learner's formula is many ops: the deadline can stop it here
        for o in operands:
            if o.bindings:  # (rare: a formula's named intermediates)
                named = [o.bindings for o in operands if o.bindings]
                return Traced(t, expr, prec, None, _merge_steps(*named))
        return Traced(t, expr, prec)
    step = Step(
        action=action,
        op=op,
        expr=expr,
        inputs=[o.shape for o in operands],
        output=tuple(t.shape),
        bytes=t.numel() * t.element_size(),
        detail=detail or {},
    )
    # (commonly no operand has steps or bindings: a program's names are atoms)
    steps = _merge_steps(*(o.steps for o in operands), [step]) if any(
        o.steps for o in operands) else [step]  # fmt: skip
    bindings = _merge_steps(*(o.bindings for o in operands)) if any(
        o.bindings for o in operands) else None  # fmt: skip
    return Traced(t, expr, prec, steps, bindings)
