"""The learner's formula: source text -> calls on `Traced` operands, through an allowlist.

The only door from learner text to the server. `parse` reads the text with `ast.parse` (which
builds a tree and no code object) and walks every node against the allowlist below: node
types, operators, names, attributes, methods, `torch` functions and keyword arguments. Nothing
outside it is reached, so nothing needs to be forbidden: there is no `eval`, `exec` or
`compile`, no `getattr` with a name the learner typed (each method is looked up in our own
table), and every operand is a `Traced` whose methods are ours and never write in place.

`evaluate` then runs the formula over `Traced` operands: on meta tensors it is the dry run
(shapes, bytes and work before anything is allocated, and the trace in the same step format
as every built-in op); on real tensors it computes. Shape errors are caught before torch sees
them and explained with both operands right-aligned and a hint (`app.lab.hints`).

Python numbers are bounded (`MAX_INT`, `MAX_EXPONENT`): `10**10**10` is refused, not computed.
"""

from __future__ import annotations

import ast
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from app.lab import hints
from app.ops.base import (
    COMPARISONS,
    BroadcastError,
    Traced,
    _merge_steps,
    broadcast_rule,
    einsum,
    filled_like,
    one_hot,
    where,
)

MAX_SOURCE_CHARS = 2000
MAX_STATEMENTS = 24
MAX_NODES = 600
MAX_DEPTH = 40
_PARSE_LOCK = threading.Lock()  # parse: one ast.parse at a time
MAX_INT = 2**63 - 1
MAX_EXPONENT = 64


class FormulaError(ValueError):
    """Why a formula cannot run: a message for the learner and, for shape errors, the
    operands and the clashing dim (`details`) so the page can draw the alignment table."""

    def __init__(self, message: str, kind: str = "formula", **details: Any):
        super().__init__(message)
        self.kind = kind  # syntax, not_allowed, name, shape, result_shape, budget, work
        self.details = details


# --------------------------------------------------------------------------- the allowlist

_OPERATORS: dict[type, str] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.MatMult: "@",
    ast.Pow: "**",
}
_COMPARE_OPS: dict[type, str] = {
    ast.Gt: "gt",
    ast.Lt: "lt",
    ast.GtE: "ge",
    ast.LtE: "le",
    ast.Eq: "eq",
    ast.NotEq: "ne",
}
_NODES = frozenset(
    {
        ast.Module,
        ast.Assign,
        ast.Expr,
        ast.Name,
        ast.Load,
        ast.Store,
        ast.Attribute,
        ast.Call,
        ast.keyword,
        ast.Constant,
        ast.BinOp,
        ast.UnaryOp,
        ast.USub,
        ast.UAdd,
        ast.Compare,
        ast.Subscript,
        ast.Slice,
        ast.Tuple,
        *_OPERATORS,
        *_COMPARE_OPS,
    }
)


@dataclass(frozen=True)
class Method:
    """A tensor method the learner may call: our `Traced` function and its keywords."""

    call: Callable[..., Any]
    keywords: frozenset[str] = field(default_factory=frozenset)


def _kw(*names: str) -> frozenset[str]:
    return frozenset(names)


_REDUCE = _kw("dim", "keepdim")
METHODS: dict[str, Method] = {
    "unsqueeze": Method(Traced.unsqueeze, _kw("dim")),
    "squeeze": Method(Traced.squeeze, _kw("dim")),
    "sum": Method(Traced.sum, _REDUCE),
    "mean": Method(Traced.mean, _REDUCE),
    "max": Method(Traced.max, _REDUCE),
    "min": Method(Traced.min, _REDUCE),
    "amax": Method(Traced.amax, _REDUCE),
    "amin": Method(Traced.amin, _REDUCE),
    "t": Method(Traced.transpose2d),
    "transpose": Method(Traced.transpose, _kw("dim0", "dim1")),
    "permute": Method(lambda x, *dims: Traced.permute(x, *_flat_ints(dims))),
    "reshape": Method(lambda x, *shape: Traced.reshape(x, *_flat_ints(shape))),
    "view": Method(lambda x, *shape: Traced.view(x, *_flat_ints(shape))),
    "expand": Method(lambda x, *sizes: Traced.expand(x, *_flat_ints(sizes))),
    "pow": Method(lambda x, exponent: x.pow(_literal_exponent(exponent)), _kw("exponent")),
    "exp": Method(Traced.exp),
    "log": Method(Traced.log),
    "sqrt": Method(Traced.sqrt),
    "rsqrt": Method(Traced.rsqrt),
    "tanh": Method(Traced.tanh),
    "sigmoid": Method(Traced.sigmoid),
    "abs": Method(Traced.abs),
    "clamp": Method(Traced.clamp, _kw("min", "max")),
    "clamp_min": Method(lambda x, min: x.clamp_min(min), _kw("min")),  # noqa: A006
    "clamp_max": Method(lambda x, max: x.clamp_max(max), _kw("max")),  # noqa: A006
    "float": Method(Traced.float),
    "double": Method(Traced.double),
    "softmax": Method(Traced.softmax, _kw("dim")),
    "log_softmax": Method(Traced.log_softmax, _kw("dim")),
    "to": Method(lambda x, dtype: x.to(dtype), _kw("dtype")),
    "gather": Method(lambda x, dim, index: x.gather(dim, index), _kw("dim", "index")),
    "size": Method(lambda x, dim=None: x.shape if dim is None else x.shape[dim], _kw("dim")),
    "dim": Method(lambda x: x.ndim),
    "numel": Method(lambda x: math.prod(x.shape)),
    **{op: Method(lambda x, other, op=op: x.compare(op, other)) for op in COMPARISONS},
}
# attributes read without a call
ATTRIBUTES: dict[str, Callable[[Traced], Any]] = {
    "T": lambda x: x.T,
    "shape": lambda x: x.shape,
    "ndim": lambda x: x.ndim,
    "values": lambda x: x,  # `.max(dim).values`: our max(dim) already gives the values
}
# `torch.exp(x)` is `x.exp()`: these functions are the methods of the same name
_AS_FUNCTIONS = ("exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "abs", "softmax",
                 "log_softmax", "sum", "mean", "clamp")  # fmt: skip
TORCH_FUNCTIONS: dict[str, Method] = {
    "where": Method(where),
    "einsum": Method(lambda equation, *ops: einsum(equation, *_flat_traced(ops))),
    "matmul": Method(lambda a, b: a @ b),
    "ones_like": Method(lambda x: filled_like(x, 1.0)),
    "zeros_like": Method(lambda x: filled_like(x, 0.0)),
    **{name: METHODS[name] for name in _AS_FUNCTIONS},
}


# torch.nn.functional, as the built-in code writes it (`F.one_hot(target, 10)`)
FUNCTIONAL: dict[str, Method] = {
    "one_hot": Method(lambda index, num_classes: one_hot(index, num_classes), _kw("num_classes")),
    "softmax": METHODS["softmax"],
    "log_softmax": METHODS["log_softmax"],
}
NAMESPACES = {"torch": TORCH_FUNCTIONS, "F": FUNCTIONAL}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _flat_ints(args: tuple) -> tuple[int, ...]:
    """`reshape(2, 3)` and `reshape((2, 3))` alike."""
    if len(args) == 1 and isinstance(args[0], tuple):
        args = args[0]
    if not all(_is_int(a) for a in args):
        raise FormulaError("sizes and dims must be whole numbers", "not_allowed")
    return args


def _flat_traced(args: tuple) -> tuple[Traced, ...]:
    if not args or not all(isinstance(a, Traced) for a in args):
        raise FormulaError("torch.einsum takes its equation, then tensors", "not_allowed")
    return args


def _literal_exponent(value: Any) -> float:
    if not _is_number(value) or abs(value) > MAX_EXPONENT:
        raise FormulaError(
            f"an exponent must be a number between -{MAX_EXPONENT} and {MAX_EXPONENT}",
            "not_allowed",
        )
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Formula:
    """A checked formula: `locals` are `name = expr` lines, then the final expression."""

    key: str  # "x.g"
    source: str
    locals: tuple[tuple[str, ast.expr], ...]
    result: ast.expr

    @property
    def grad(self) -> str:
        return self.key.removesuffix(".g")


def parse(key: str, source: str) -> Formula:
    """Read and check a formula against the allowlist; no tensor is touched."""
    if len(source) > MAX_SOURCE_CHARS:
        raise FormulaError(
            f"the formula is {len(source)} characters long; at most {MAX_SOURCE_CHARS}",
            "too_long",
        )
    if not source.strip():
        raise FormulaError("the formula is empty", "syntax")
    try:
        # a tree only: ast.parse creates no code object and runs nothing. One at a time:
        # 3.11's AST constructor keeps its depth in shared state (SystemError in threads)
        with _PARSE_LOCK:
            try:
                tree = ast.parse(source, mode="exec")
            except SystemError:  # a library's parse in another thread overlapped: once more
                tree = ast.parse(source, mode="exec")
    except SyntaxError as err:
        where_ = f" (line {err.lineno}, column {err.offset})" if err.lineno else ""
        raise FormulaError(f"syntax error{where_}: {err.msg}", "syntax") from None
    except (ValueError, MemoryError, RecursionError, SystemError) as err:
        raise FormulaError(f"the formula cannot be read: {err}", "syntax") from None
    _check_tree(tree, source)
    body = tree.body
    if not body:
        raise FormulaError("the formula is empty", "syntax")
    if len(body) > MAX_STATEMENTS:
        raise FormulaError(f"at most {MAX_STATEMENTS} lines, got {len(body)}", "too_long")
    local_lines: list[tuple[str, ast.expr]] = []
    for stmt in body[:-1]:
        if isinstance(stmt, ast.Assign) and _single_name_target(stmt):
            local_lines.append((stmt.targets[0].id, stmt.value))
        elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and _is_grad(stmt.targets[0]):
            # `xhat.g = ...`: a local's gradient, as the built-in formulas write them
            local_lines.append((f"{stmt.targets[0].value.id}.g", stmt.value))
        else:
            raise FormulaError(
                f"`{_segment(source, stmt)}`: every line but the last must be "
                "`name = expression` (or `local.g = expression`)",
                "not_allowed",
            )
    last = body[-1]
    if isinstance(last, ast.Expr):
        result = last.value
    elif isinstance(last, ast.Assign) and len(last.targets) == 1 and _is_grad(last.targets[0]):
        target = f"{last.targets[0].value.id}.g"
        if target != key:
            raise FormulaError(
                f"this formula is for {key}, but its last line sets {target}", "name"
            )
        result = last.value
    else:
        raise FormulaError(
            f"the last line must be the gradient: an expression, or `{key} = expression`",
            "not_allowed",
        )
    return Formula(key, source, tuple(local_lines), result)


def _single_name_target(stmt: ast.Assign) -> bool:
    return len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)


def _is_grad(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "g" and isinstance(node.value, ast.Name)


def _check_tree(tree: ast.AST, source: str) -> None:
    """Every node, iteratively (a deep tree cannot overflow our stack), against the allowlist."""
    stack: list[tuple[ast.AST, int]] = [(tree, 0)]
    count = 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise FormulaError(f"the formula has over {MAX_NODES} parts; simplify it", "too_long")
        if depth > MAX_DEPTH:
            raise FormulaError(f"the formula nests over {MAX_DEPTH} levels deep", "too_long")
        if type(node) not in _NODES:
            raise FormulaError(_not_allowed_message(node, source), "not_allowed")
        _check_node(node, source)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _check_node(node: ast.AST, source: str) -> None:
    if isinstance(node, ast.Name) and node.id.startswith("_"):
        raise FormulaError(f"`{node.id}`: names starting with _ are not allowed", "not_allowed")
    if isinstance(node, ast.Attribute):
        if node.attr.startswith("_"):
            raise FormulaError(
                f"`{_segment(source, node)}`: private and dunder attributes are not allowed",
                "not_allowed",
            )
        allowed = {"g", *METHODS, *ATTRIBUTES, *TORCH_FUNCTIONS, *FUNCTIONAL, *DTYPES}
        if node.attr not in allowed:
            raise FormulaError(_unknown_attribute(node, source), "not_allowed")
    if isinstance(node, ast.Constant) and not (
        node.value is None
        or node.value is Ellipsis
        or isinstance(node.value, (int, float, str))
        and not isinstance(node.value, complex)
    ):
        raise FormulaError(
            f"`{_segment(source, node)}`: only numbers, None and ... are allowed", "not_allowed"
        )
    if isinstance(node, ast.Compare) and len(node.ops) != 1:
        raise FormulaError(f"`{_segment(source, node)}`: one comparison at a time", "not_allowed")
    if isinstance(node, ast.keyword) and node.arg is None:
        raise FormulaError("`**` arguments are not allowed", "not_allowed")
    if isinstance(node, ast.Assign) and not (
        _single_name_target(node) or (len(node.targets) == 1 and _is_grad(node.targets[0]))
    ):
        raise FormulaError(f"`{_segment(source, node)}`: assign to one plain name", "not_allowed")


def _not_allowed_message(node: ast.AST, source: str) -> str:
    what = {
        ast.Import: "imports",
        ast.ImportFrom: "imports",
        ast.Lambda: "lambdas",
        ast.ListComp: "comprehensions",
        ast.SetComp: "comprehensions",
        ast.DictComp: "comprehensions",
        ast.GeneratorExp: "generators",
        ast.JoinedStr: "f-strings",
        ast.AugAssign: "in-place assignment (`+=` and the like)",
        ast.NamedExpr: "`:=`",
        ast.IfExp: "`x if c else y` (use torch.where)",
        ast.BoolOp: "`and` / `or` (use a mask, e.g. (a > 0) * (b > 0))",
    }.get(type(node), type(node).__name__)
    segment = _segment(source, node)
    prefix = f"`{segment}`: " if segment and len(segment) <= 80 else ""
    return f"{prefix}{what} not allowed in a formula"


def _unknown_attribute(node: ast.Attribute, source: str) -> str:
    name = node.attr
    if name.endswith("_"):
        return f"`.{name}`: in-place methods (a trailing _) are not allowed: formulas never write"
    if name in ("data", "numpy", "storage", "untyped_storage", "tolist", "item", "grad"):
        return f"`.{name}` is not allowed: formulas work on the traced tensors only"
    allowed = ", ".join(sorted({*METHODS, *ATTRIBUTES}))
    return f"`.{name}` is not an allowed method or attribute; allowed: {allowed}"


def _segment(source: str, node: ast.AST) -> str:
    return (ast.get_source_segment(source, node) or "").strip()


# --------------------------------------------------------------------------- evaluation


class _Evaluation:
    """One evaluation of a formula over named `Traced` operands."""

    def __init__(
        self,
        formula: Formula,
        tensors: Mapping[str, Traced],
        grads: Mapping[str, Traced],
        pending: Mapping[str, str],
    ):
        self.formula = formula
        self.source = formula.source
        self.tensors = tensors  # the run's tensors, by trace name
        self.grads = grads  # gradients computed before this one, by tensor name
        self.pending = pending  # gradients of the run not available here: name -> why
        self.locals: dict[str, Any] = {}

    def run(self) -> Traced:
        for name, node in self.formula.locals:
            base = name.removesuffix(".g")
            if base in self.tensors or base in NAMESPACES:
                raise FormulaError(
                    f"`{name} = ...`: {base} is the run's own; choose another local name", "name"
                )
            if name != base and base not in self.locals:
                raise FormulaError(
                    f"`{name} = ...`: define the local {base} before its gradient", "name"
                )
            value = self.eval(node)
            if not isinstance(value, Traced):
                self.locals[name] = value
            elif name != base:  # a local's gradient: defined after the local, as in the code
                self.locals[name] = value.named(name, grad_of=self.locals[base])
            else:
                self.locals[name] = value.named(name)
        value = self.eval(self.formula.result)
        if not isinstance(value, Traced):
            raise FormulaError(
                f"the formula gives the number {value!r}, not a tensor of the gradient's shape",
                "result_shape",
            )
        # every line runs, used or not: its steps are the formula's cost and its trace
        made = [v.steps for v in self.locals.values() if isinstance(v, Traced)]
        steps = _merge_steps(*made, value.steps)
        return Traced(value.t, value.expr, value.prec, steps, value.bindings)

    def eval(self, node: ast.AST) -> Any:
        handler = _HANDLERS.get(type(node))
        if handler is None:  # a node the tree check allows, but not where a value goes
            self.fail(node, "not allowed here", "not_allowed")
        return handler(self, node)

    def fail(self, node: ast.AST, message: str, kind: str = "formula", **details: Any):
        segment = _segment(self.source, node)
        raise FormulaError(f"`{segment}`: {message}", kind, expr=segment, **details)

    # ---- leaves

    def _Constant(self, node: ast.Constant) -> Any:
        if _is_int(node.value) and abs(node.value) > MAX_INT:
            self.fail(node, f"numbers above {MAX_INT} are not allowed", "not_allowed")
        return node.value

    def _Name(self, node: ast.Name) -> Any:
        if node.id in self.locals:
            return self.locals[node.id]
        if node.id in self.tensors:
            return self.tensors[node.id]
        if node.id in NAMESPACES:
            self.fail(node, f"{node.id} is only for calls such as torch.einsum(...)", "not_allowed")
        names = ", ".join(self.tensors)
        self.fail(node, f"the run has no tensor or local named {node.id}; it has: {names}", "name")

    def _Attribute(self, node: ast.Attribute) -> Any:
        if node.attr == "g":
            return self._gradient(node)
        if isinstance(node.value, ast.Name) and node.value.id == "torch" and node.attr in DTYPES:
            return DTYPES[node.attr]
        value = self.eval(node.value)
        if node.attr not in ATTRIBUTES or not isinstance(value, Traced):
            self.fail(node, f".{node.attr} must be called, on a tensor", "not_allowed")
        return self._apply(node, ATTRIBUTES[node.attr], value)

    def _gradient(self, node: ast.Attribute) -> Traced:
        if not isinstance(node.value, ast.Name):
            self.fail(node, ".g is read on a tensor's name, as in l1.g", "not_allowed")
        name = node.value.id
        if f"{name}.g" in self.locals:
            return self.locals[f"{name}.g"]
        if name in self.grads:
            return self.grads[name]
        if name in self.pending:
            self.fail(node, self.pending[name], "name")
        have = ", ".join(f"{n}.g" for n in self.grads) or "none"
        self.fail(node, f"the run has no gradient {name}.g; available here: {have}", "name")

    # ---- operators

    def _UnaryOp(self, node: ast.UnaryOp) -> Any:
        value = self.eval(node.operand)
        if isinstance(node.op, ast.UAdd):
            return value
        if isinstance(value, Traced):
            return -value
        if _is_number(value):
            return -value
        self.fail(node, "only numbers and tensors can be negated", "not_allowed")

    def _BinOp(self, node: ast.BinOp) -> Any:
        symbol = _OPERATORS[type(node.op)]
        left, right = self.eval(node.left), self.eval(node.right)
        if symbol == "**":
            return self._power(node, left, right)
        if symbol == "@" and not (isinstance(left, Traced) and isinstance(right, Traced)):
            self.fail(node, "@ multiplies two tensors", "not_allowed")
        if _is_number(left) and _is_number(right):
            return self._number(node, symbol, left, right)
        if not all(isinstance(v, Traced) or _is_number(v) for v in (left, right)):
            self.fail(node, f"{symbol} takes tensors and numbers", "not_allowed")
        if symbol == "@":
            return self._matmul(node, left, right)
        if isinstance(left, Traced) and isinstance(right, Traced):
            self._check_broadcast(node, symbol, left, right)
        ops = {"+": _add, "-": _sub, "*": _mul, "/": _div}
        return self._apply(node, ops[symbol], left, right)

    def _power(self, node: ast.BinOp, base: Any, exponent: Any) -> Any:
        if not _is_number(exponent) or not _is_literal(node.right):
            self.fail(node, "the exponent must be a literal number, as in x ** 2", "not_allowed")
        exponent = _literal_exponent(exponent)
        if isinstance(base, Traced):
            return self._apply(node, lambda b: b**exponent, base)
        if _is_number(base):
            return self._number(node, "**", base, exponent)
        self.fail(node, "** takes a tensor or a number", "not_allowed")

    def _number(self, node: ast.AST, symbol: str, a: float, b: float) -> float:
        """Arithmetic on Python numbers, bounded: operands are at most MAX_INT and exponents
        at most MAX_EXPONENT, so no result is ever a huge integer."""
        try:
            if symbol == "**":
                if _is_int(a) and _is_int(b) and b >= 0 and abs(a) > 1:
                    if b * math.log2(abs(a)) > 63:
                        self.fail(node, f"the result is above {MAX_INT}", "not_allowed")
                value = a**b
            else:
                value = {"+": _add, "-": _sub, "*": _mul, "/": _div}[symbol](a, b)
        except (ZeroDivisionError, OverflowError) as err:
            self.fail(node, str(err), "not_allowed")
        if isinstance(value, complex):
            self.fail(node, "the result is a complex number", "not_allowed")
        if _is_int(value) and abs(value) > MAX_INT:
            self.fail(node, f"the result is above {MAX_INT}", "not_allowed")
        return value

    def _check_broadcast(self, node: ast.AST, symbol: str, left: Traced, right: Traced) -> None:
        try:
            broadcast_rule(left.shape, right.shape)
        except BroadcastError as err:
            exprs = [_segment(self.source, n) for n in (node.left, node.right)]
            self.fail(
                node,
                hints.broadcast_clash(symbol, exprs, [left.shape, right.shape], err),
                "shape",
                operands=[
                    {"expr": e, "shape": list(s)} for e, s in zip(exprs, (left.shape, right.shape))
                ],
                dim=err.dim,
                sizes=[err.a, err.b],
            )

    def _matmul(self, node: ast.BinOp, left: Any, right: Any) -> Traced:
        if not (isinstance(left, Traced) and isinstance(right, Traced)):
            self.fail(node, "@ multiplies two tensors", "not_allowed")
        problem = hints.matmul_problem(left.shape, right.shape)
        if problem:
            exprs = [_segment(self.source, n) for n in (node.left, node.right)]
            self.fail(
                node,
                hints.matmul_clash(exprs, [left.shape, right.shape], problem),
                "shape",
                operands=[
                    {"expr": e, "shape": list(s)} for e, s in zip(exprs, (left.shape, right.shape))
                ],
            )
        return self._apply(node, _matmul, left, right)

    def _Compare(self, node: ast.Compare) -> Any:
        op = _COMPARE_OPS[type(node.ops[0])]
        left, right = self.eval(node.left), self.eval(node.comparators[0])
        if _is_number(left) and _is_number(right):
            return {"gt": left > right, "lt": left < right, "ge": left >= right,
                    "le": left <= right, "eq": left == right, "ne": left != right}[op]  # fmt: skip
        if not isinstance(left, Traced):
            self.fail(node, "put the tensor on the left of a comparison", "not_allowed")
        if isinstance(right, Traced):
            self._check_broadcast(
                ast.BinOp(left=node.left, op=ast.Mult(), right=node.comparators[0]),
                COMPARISONS[op],
                left,
                right,
            )
        elif not _is_number(right):
            self.fail(node, "a tensor compares with a tensor or a number", "not_allowed")
        return self._apply(node, lambda a, b: a.compare(op, b), left, right)

    # ---- indexing

    def _Subscript(self, node: ast.Subscript) -> Any:
        value = self.eval(node.value)
        index = self.eval(node.slice)
        parts = index if isinstance(index, tuple) else (index,)
        if not all(p is None or p is Ellipsis or _is_int(p) or isinstance(p, slice) for p in parts):
            self.fail(node, "index with whole numbers, slices, None and ... only", "not_allowed")
        if isinstance(value, tuple):  # a shape
            if not _is_int(index):
                self.fail(node, "a shape is indexed by one whole number", "not_allowed")
            return self._apply(node, lambda v: v[index], value)
        if not isinstance(value, Traced):
            self.fail(node, "only tensors and shapes can be indexed", "not_allowed")
        return self._apply(node, lambda v: v[index], value)

    def _Slice(self, node: ast.Slice) -> slice:
        parts = [None if p is None else self.eval(p) for p in (node.lower, node.upper, node.step)]
        if not all(p is None or _is_int(p) for p in parts):
            self.fail(node, "slice bounds must be whole numbers", "not_allowed")
        return slice(*parts)

    def _Tuple(self, node: ast.Tuple) -> tuple:
        values = tuple(self.eval(e) for e in node.elts)
        if any(isinstance(v, Traced) for v in values):  # tuples are for sizes, dims, indices
            self.fail(node, "tuples hold sizes, dims or indices, not tensors", "not_allowed")
        return values

    # ---- calls

    def _Call(self, node: ast.Call) -> Any:
        func = node.func
        if not isinstance(func, ast.Attribute):
            self.fail(node, "only tensor methods and torch.<function> can be called", "not_allowed")
        if isinstance(func.value, ast.Name) and func.value.id in NAMESPACES:
            space = func.value.id
            method = NAMESPACES[space].get(func.attr)
            if method is None:
                allowed = ", ".join(f"{space}.{n}" for n in NAMESPACES[space])
                self.fail(node, f"{space}.{func.attr} is not allowed; allowed: {allowed}",
                          "not_allowed")  # fmt: skip
            receiver: tuple = ()
        else:
            method = METHODS.get(func.attr)
            if method is None:
                self.fail(node, f".{func.attr} is not a method here", "not_allowed")
            value = self.eval(func.value)
            if not isinstance(value, Traced):
                self.fail(node, f".{func.attr}() is called on a tensor", "not_allowed")
            receiver = (value,)
        args = [self._argument(a) for a in node.args]
        kwargs = {}
        for kw in node.keywords:
            if kw.arg not in method.keywords:
                allowed = ", ".join(sorted(method.keywords)) or "none"
                self.fail(node, f"keyword {kw.arg}= is not taken here (allowed: {allowed})",
                          "not_allowed")  # fmt: skip
            kwargs[kw.arg] = self._argument(kw.value)
        return self._apply(node, method.call, *receiver, *args, **kwargs)

    def _argument(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if len(node.value) > 64:
                self.fail(node, "an einsum equation is at most 64 characters", "not_allowed")
            return node.value
        return self.eval(node)

    # ---- applying an operation

    def _apply(self, node: ast.AST, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one allowed operation; torch's own complaints become the learner's message."""
        try:
            return fn(*args, **kwargs)
        except FormulaError as err:
            if err.details.get("expr"):
                raise
            self.fail(node, str(err), err.kind)
        except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as err:
            first_line = (
                str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            )
            self.fail(node, first_line, "shape" if "size" in first_line else "formula")


_HANDLERS: dict[type, Callable[[_Evaluation, Any], Any]] = {
    ast.Constant: _Evaluation._Constant,
    ast.Name: _Evaluation._Name,
    ast.Attribute: _Evaluation._Attribute,
    ast.UnaryOp: _Evaluation._UnaryOp,
    ast.BinOp: _Evaluation._BinOp,
    ast.Compare: _Evaluation._Compare,
    ast.Subscript: _Evaluation._Subscript,
    ast.Slice: _Evaluation._Slice,
    ast.Tuple: _Evaluation._Tuple,
    ast.Call: _Evaluation._Call,
}


def _add(a: Any, b: Any) -> Any:
    return a + b


def _sub(a: Any, b: Any) -> Any:
    return a - b


def _mul(a: Any, b: Any) -> Any:
    return a * b


def _div(a: Any, b: Any) -> Any:
    return a / b


def _matmul(a: Traced, b: Traced) -> Traced:
    return a @ b


def _is_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
    return isinstance(node, ast.Constant) and _is_number(node.value)


def evaluate(
    formula: Formula,
    tensors: Mapping[str, Traced],
    grads: Mapping[str, Traced],
    pending: Mapping[str, str] | None = None,
) -> Traced:
    """The formula's value over `Traced` operands (meta: the dry run; real: the numbers).

    `tensors` are the run's tensors by name, `grads` the gradients it may use (by tensor
    name, each a `Traced` named `<name>.g`), `pending` why the run's other gradients are not
    available to it."""
    return _Evaluation(formula, tensors, grads, pending or {}).run()
