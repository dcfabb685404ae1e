"""The lab's expression evaluator: an allowlisted `ast` expression over `Traced` operands.

`Evaluator` evaluates one expression at a time and asks whoever runs it (`Names`) what a name
means: a formula's `Evaluation` (app/lab/evaluation.py, `evaluate`) or a program's
interpreter (app/lab/statements.py). On meta tensors it is the dry run (shapes, bytes and
work before anything is allocated, and the trace in the same step format as every built-in
op); on real tensors it computes. Shape errors are caught before torch sees them and
explained with both operands right-aligned and a hint (`app.lab.hints`).
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, Protocol

import torch

from app.lab import hints
from app.lab.allowlist import (
    ATTRIBUTES,
    BUILTINS,
    COMPARE_OPS,
    DTYPES,
    KEYWORD_ALIASES,
    LIST_METHODS,
    MATH_CONSTANTS,
    MAX_INT,
    METHODS,
    NAMESPACES,
    OPERATORS,
    PAIR_ATTRIBUTES,
    FormulaError,
    Pair,
    is_int,
    is_number,
    literal_exponent,
)
from app.lab.builtins import PythonBuiltins
from app.lab.parse import source_segment
from app.ops.broadcast import BroadcastError, broadcast_shape
from app.ops.cancel import is_allocation_failure
from app.ops.joining import TensorList
from app.ops.making import MakeError, Maker
from app.ops.traced import COMPARISONS, Traced

# --------------------------------------------------------------------------- evaluation


class Names(Protocol):
    """What the evaluator asks of whoever runs it: the value of a bare name (`name`) and of a
    gradient read as `<name>.g` (`gradient`), what an in-place method (a trailing _) may
    write (`before_write`, `after_write`), and where a tensor it makes goes (`maker`). A
    formula's `Evaluation` answers for a formula; a program's interpreter
    (app.lab.statements.Interpreter) for its lines."""

    def name(self, node: ast.Name) -> Any: ...
    def gradient(self, node: ast.Attribute) -> Any: ...
    def before_write(self, node: ast.AST, target: ast.expr, value: Any) -> None: ...
    def after_write(self, target: ast.expr, value: Any) -> None: ...
    def maker(self) -> Maker: ...


class Evaluator(PythonBuiltins):
    """Evaluates one expression's `ast` over `Traced` operands, asking `names` what a name
    means and what a write may do. One method per node type; a node it does not know is
    refused."""

    def __init__(self, source: str, names: Names):
        self.source = source
        self.names = names
        self._name = names.name  # (bound once: a name is the node read most often)
        self.made_steps: list = []  # the steps of every tensor made since the last take
        self._made_ids: set[int] = set()

    def eval(self, node: ast.AST) -> Any:
        if type(node) is ast.Name:  # (what `_Name` does, one call fewer)
            return self._name(node)
        handler = _HANDLERS.get(type(node))
        if handler is None:  # a node the tree check allows, but not where a value goes
            self.fail(node, "not allowed here", "not_allowed")
        return handler(self, node)

    def fail(self, node: ast.AST, message: str, kind: str = "formula", **details: Any) -> NoReturn:
        segment = source_segment(self.source, node)
        raise FormulaError(f"`{segment}`: {message}", kind, expr=segment, **details)

    # ---- leaves

    def _Constant(self, node: ast.Constant) -> Any:
        if is_int(node.value) and abs(node.value) > MAX_INT:
            self.fail(node, f"numbers above {MAX_INT} are not allowed", "not_allowed")
        return node.value

    def _Name(self, node: ast.Name) -> Any:
        return self.names.name(node)

    def _Attribute(self, node: ast.Attribute) -> Any:
        if node.attr == "g":
            return self.names.gradient(node)
        if isinstance(node.value, ast.Name) and node.value.id == "torch" and node.attr in DTYPES:
            return DTYPES[node.attr]
        if isinstance(node.value, ast.Name) and node.value.id == "math":
            if node.attr not in MATH_CONSTANTS:
                self.fail(node, f"math.{node.attr} is called: math.{node.attr}(number)",
                          "not_allowed")  # fmt: skip
            return MATH_CONSTANTS[node.attr]
        value = self.eval(node.value)
        if node.attr in PAIR_ATTRIBUTES:
            if isinstance(value, Pair):
                return getattr(value, node.attr)
            self.fail(
                node,
                f".{node.attr} belongs to the (values, indices) pair that .max(dim) or "
                ".min(dim) gives; a tensor has no such attribute",
                "not_allowed",
            )
        if isinstance(value, Pair):
            self.pair_misused(node)
        if node.attr not in ATTRIBUTES or not isinstance(value, Traced):
            self.fail(node, f".{node.attr} must be called, on a tensor", "not_allowed")
        return self.apply(node, ATTRIBUTES[node.attr], value)

    def pair_misused(self, node: ast.AST) -> None:
        self.fail(
            node,
            "x.max(dim) and x.min(dim) give (values, indices), as in PyTorch: take "
            "x.max(dim).values (or x.amax(dim)) for the numbers",
            "not_allowed",
        )

    # ---- operators

    def _UnaryOp(self, node: ast.UnaryOp) -> Any:
        value = self.eval(node.operand)
        if isinstance(node.op, ast.UAdd):
            return value
        if isinstance(value, Traced):
            return -value
        if is_number(value):
            return -value
        self.fail(node, "only numbers and tensors can be negated", "not_allowed")

    def _BinOp(self, node: ast.BinOp) -> Any:
        symbol = OPERATORS[type(node.op)]
        left, right = self.eval(node.left), self.eval(node.right)
        if isinstance(left, Pair) or isinstance(right, Pair):
            self.pair_misused(node)
        if symbol == "**":
            return self._power(node, left, right)
        if symbol in ("//", "%"):
            if not (is_int(left) and is_int(right)):
                self.fail(node, f"{symbol} is for whole numbers here (sizes, steps)", "not_allowed")
            if right == 0:
                self.fail(node, f"{symbol} by zero", "not_allowed")
            return left // right if symbol == "//" else left % right
        if symbol == "@" and not (isinstance(left, Traced) and isinstance(right, Traced)):
            self.fail(node, "@ multiplies two tensors", "not_allowed")
        if is_number(left) and is_number(right):
            return self.number(node, symbol, left, right)
        if not (_operand(left) and _operand(right)):
            self.fail(node, f"{symbol} takes tensors and numbers", "not_allowed")
        if symbol == "@":
            return self._matmul(node, left, right)
        if isinstance(left, Traced) and isinstance(right, Traced):
            self.check_broadcast(node, symbol, left, right)
        return self.apply(node, _ARITHMETIC[symbol], left, right)

    def _power(self, node: ast.BinOp, base: Any, exponent: Any) -> Any:
        if not is_number(exponent) or not _is_literal(node.right):
            self.fail(node, "the exponent must be a literal number, as in x ** 2", "not_allowed")
        exponent = literal_exponent(exponent)
        if isinstance(base, Traced):
            return self.apply(node, lambda b: b**exponent, base)
        if is_number(base):
            return self.number(node, "**", base, exponent)
        self.fail(node, "** takes a tensor or a number", "not_allowed")

    def number(self, node: ast.AST, symbol: str, a: float, b: float) -> float:
        """Arithmetic on Python numbers, bounded: operands are at most MAX_INT and exponents
        at most MAX_EXPONENT, so no result is ever a huge integer."""
        try:
            if symbol == "**":
                if is_int(a) and is_int(b) and b >= 0 and abs(a) > 1:
                    if b * math.log2(abs(a)) > 63:
                        self.fail(node, f"the result is above {MAX_INT}", "not_allowed")
                value = a**b
            else:
                value = _ARITHMETIC[symbol](a, b)
        except (ZeroDivisionError, OverflowError) as err:
            self.fail(node, str(err), "not_allowed")
        if isinstance(value, complex):
            self.fail(node, "the result is a complex number", "not_allowed")
        if is_int(value) and abs(value) > MAX_INT:
            self.fail(node, f"the result is above {MAX_INT}", "not_allowed")
        return value

    def check_broadcast(self, node: ast.AST, symbol: str, left: Traced, right: Traced) -> None:
        try:
            broadcast_shape(left.shape, right.shape)  # (the rule itself is the trace's)
        except BroadcastError as err:
            exprs = [source_segment(self.source, n) for n in (node.left, node.right)]
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
            exprs = [source_segment(self.source, n) for n in (node.left, node.right)]
            self.fail(
                node,
                hints.matmul_clash(exprs, [left.shape, right.shape], problem),
                "shape",
                operands=[
                    {"expr": e, "shape": list(s)} for e, s in zip(exprs, (left.shape, right.shape))
                ],
            )
        return self.apply(node, _matmul, left, right)

    def _Compare(self, node: ast.Compare) -> Any:
        op = COMPARE_OPS[type(node.ops[0])]
        left, right = self.eval(node.left), self.eval(node.comparators[0])
        if is_number(left) and is_number(right):
            return {"gt": left > right, "lt": left < right, "ge": left >= right,
                    "le": left <= right, "eq": left == right, "ne": left != right}[op]  # fmt: skip
        if not isinstance(left, Traced):
            self.fail(node, "put the tensor on the left of a comparison", "not_allowed")
        if isinstance(right, Traced):
            self.check_broadcast(
                ast.BinOp(left=node.left, op=ast.Mult(), right=node.comparators[0]),
                COMPARISONS[op],
                left,
                right,
            )
        elif not is_number(right):
            self.fail(node, "a tensor compares with a tensor or a number", "not_allowed")
        return self.apply(node, lambda a, b: a.compare(op, b), left, right)

    # ---- indexing

    def _Subscript(self, node: ast.Subscript) -> Any:
        value = self.eval(node.value)
        index = self.subscript(node.slice)
        parts = index if isinstance(index, tuple) else (index,)
        if isinstance(value, Pair):  # (values, indices)[0]
            if not is_int(index) or index not in (0, 1, -1, -2):
                self.fail(node, "(values, indices) is indexed by 0 or 1", "not_allowed")
            return value[index]
        advanced, basic = False, True  # (one pass over the parts: every loop step's index)
        for p in parts:
            if type(p) is int:  # (the common case: a loop's index)
                continue
            if isinstance(p, (Traced, range)):
                advanced = True
            elif not (p is None or p is Ellipsis or is_int(p) or isinstance(p, slice)):
                basic = False
        if advanced:
            if not isinstance(value, Traced):
                self.fail(node, "only tensors are indexed by tensors", "not_allowed")
            return self.apply(node, self.advanced_index, value, parts)
        if not basic:
            self.fail(node, "index with whole numbers, slices, None, ... and tensors only",
                      "not_allowed")  # fmt: skip
        if type(value) is Traced:  # (what the last line below does, without the list checks)
            return self.apply(node, Traced.__getitem__, value, index)
        if isinstance(value, (list, tuple)):
            if is_int(index):  # an element: a list's or split's (hs[t], hs[-1]), a shape's size
                return self.apply(node, operator.getitem, value, index)
            if isinstance(value, TensorList) or any(isinstance(v, Traced) for v in value):
                if isinstance(index, slice):  # hs[1:]
                    return TensorList(value[index])
                self.fail(node, "a list of tensors is indexed by a whole number or a slice",
                          "not_allowed")  # fmt: skip
            self.fail(node, "a shape is indexed by one whole number", "not_allowed")
        if not isinstance(value, Traced):
            self.fail(node, "only tensors and shapes can be indexed", "not_allowed")
        return self.apply(node, lambda v: v[index], value)

    def subscript(self, node: ast.AST) -> Any:
        """An index: a tuple's parts may be tensors and ranges (`logprobs[range(n), Yb]`)."""
        if isinstance(node, ast.Tuple):  # (a name, the common part, straight to the names)
            parts = []  # (a loop, not a comprehension: no function call per index)
            for e in node.elts:
                parts.append(self._name(e) if type(e) is ast.Name else self.eval(e))
            return tuple(parts)
        return self.eval(node)

    def advanced_index(self, value: Traced, parts: tuple) -> Traced:
        """Indexing with tensors as torch does it; `range(n)` is `torch.arange(n)`."""
        converted = []
        for p in parts:
            if isinstance(p, range):
                ids = torch.arange(p.start, p.stop, p.step, device=value.t.device) if len(p) else (
                    torch.zeros(0, dtype=torch.int64, device=value.t.device))  # fmt: skip
                p = Traced(ids, _range_expr(p))
            elif isinstance(p, Traced) and p.t.is_floating_point():
                raise FormulaError(
                    "a float tensor cannot index: indices are integer (or bool mask) tensors",
                    "not_allowed",
                )
            elif isinstance(p, list):
                raise FormulaError("index with a tensor (torch.tensor is not here: use "
                                   "torch.arange, or an input)", "not_allowed")  # fmt: skip
            elif not (p is None or p is Ellipsis or is_int(p) or isinstance(p, (slice, Traced))):
                raise FormulaError("index with whole numbers, slices, None, ... and tensors",
                                   "not_allowed")  # fmt: skip
            converted.append(p)
        return value.index_with(tuple(converted))

    def _Slice(self, node: ast.Slice) -> slice:
        parts = [None if p is None else self.eval(p) for p in (node.lower, node.upper, node.step)]
        if not all(p is None or is_int(p) for p in parts):
            self.fail(node, "slice bounds must be whole numbers", "not_allowed")
        return slice(*parts)

    def _Tuple(self, node: ast.Tuple) -> tuple:
        values = tuple(self.eval(e) for e in node.elts)
        if any(isinstance(v, (TensorList, Pair, range)) for v in values):
            self.fail(node, "tuples hold numbers, sizes and tensors", "not_allowed")
        return values

    def _List(self, node: ast.List) -> Any:
        """`[a, b]` of tensors (a list the program may grow with .append), or of sizes."""
        values = [self.eval(e) for e in node.elts]
        if all(isinstance(v, Traced) for v in values):
            return TensorList(values)
        if all(is_int(v) for v in values):
            return list(values)
        self.fail(node, "a list holds tensors (or whole numbers: sizes), not a mix",
                  "not_allowed")  # fmt: skip

    # ---- calls

    def _Call(self, node: ast.Call) -> Any:
        func = node.func
        if isinstance(func, ast.Name) and func.id in BUILTINS:
            return self._builtin(node, func.id)
        if not isinstance(func, ast.Attribute):
            self.fail(node, "only tensor methods, torch.<function>, F.<function> and range, len, "
                      "float, int, reversed can be called", "not_allowed")  # fmt: skip
        if isinstance(func.value, ast.Name) and func.value.id in NAMESPACES:
            space = func.value.id
            method = NAMESPACES[space].get(func.attr)
            if method is None:
                allowed = ", ".join(f"{space}.{n}" for n in NAMESPACES[space])
                self.fail(node, f"{space}.{func.attr} is not allowed; allowed: {allowed}",
                          "not_allowed")  # fmt: skip
            receiver: tuple = ()
        else:
            value = self.eval(func.value)
            if isinstance(value, Pair):
                self.pair_misused(node)
            if isinstance(value, list):
                method = LIST_METHODS.get(func.attr)
                if method is None or not isinstance(value, TensorList):
                    self.fail(node, f".{func.attr}() is not a list method here (lists take "
                              ".append(tensor))", "not_allowed")  # fmt: skip
            else:
                method = METHODS.get(func.attr)
                if method is None:
                    self.fail(node, f".{func.attr} is not a method here", "not_allowed")
                if not isinstance(value, Traced):
                    self.fail(node, f".{func.attr}() is called on a tensor", "not_allowed")
            if method.writes:
                self.names.before_write(node, func.value, value)
            receiver = (value,)
        if method.made:
            receiver = (self.names.maker(), *receiver)
        args = [self._argument(a) for a in node.args]
        kwargs = {}
        for kw in node.keywords:
            arg = KEYWORD_ALIASES.get(kw.arg, kw.arg)
            if arg not in method.keywords:
                allowed = ", ".join(sorted(method.keywords)) or "none"
                self.fail(node, f"keyword {kw.arg}= is not taken here (allowed: {allowed})",
                          "not_allowed")  # fmt: skip
            if arg in kwargs:
                self.fail(node, f"keyword {arg}= is given twice", "not_allowed")
            kwargs[arg] = self._argument(kw.value)
        result = self.apply(node, method.call, *receiver, *args, **kwargs)
        if method.writes:
            self.names.after_write(func.value, result)
        return result

    def _made(self, value: Any) -> None:
        """Every step an op makes is costed, even one whose value is dropped (`(huge, x)[1]`,
        `[huge, x][1]`): the steps of each tensor made, kept until the line is costed."""
        values = value if isinstance(value, (list, tuple)) else (value,)
        for v in values:
            if isinstance(v, Traced):
                for step in v.steps:
                    if id(step) not in self._made_ids:
                        self._made_ids.add(id(step))
                        self.made_steps.append(step)

    def take_made_steps(self) -> list:
        """The steps made since the last call (a statement's, for its cost)."""
        if not self.made_steps:  # a real run's ops make no steps (twice a statement)
            return []
        steps = self.made_steps
        self.made_steps, self._made_ids = [], set()
        return steps

    def _argument(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if len(node.value) > 64:
                self.fail(node, "a string argument is at most 64 characters", "not_allowed")
            return node.value
        return self.eval(node)

    # ---- applying an operation

    def apply(self, node: ast.AST, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one allowed operation; torch's own complaints become the learner's message."""
        try:
            result = fn(*args, **kwargs)
            if type(result) is Traced:
                if result.steps:  # (a real run's tensors have none)
                    self._made(result)
            elif type(result) not in _PLAIN:  # (a write's None, a size: nothing made)
                self._made(result)
            return result
        except FormulaError as err:
            if err.details.get("expr"):
                raise
            self.fail(node, str(err), err.kind)
        except MakeError as err:  # refused by an op before torch saw it
            self.fail(node, str(err), err.kind)
        except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as err:
            if is_allocation_failure(err):  # the run's memory limit, not the learner's formula
                raise MemoryError(str(err)) from err
            first_line = hints.torch_error_line(err)
            self.fail(node, first_line, "shape" if "size" in first_line else "formula")


# node type -> the evaluator's method that evaluates it, as a plain function of (evaluator,
# node): one dict look-up a node (a subclass that overrides a handler must extend this table)
_HANDLERS: dict[type, Callable[[Evaluator, Any], Any]] = {
    node: getattr(Evaluator, f"_{node.__name__}")
    for node in (
        ast.Constant,
        ast.Name,
        ast.Attribute,
        ast.UnaryOp,
        ast.BinOp,
        ast.Compare,
        ast.Subscript,
        ast.Slice,
        ast.Tuple,
        ast.List,
        ast.Call,
    )  # fmt: skip
}


_PLAIN = frozenset({type(None), int, float, bool})  # what an op gives that holds no tensor


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


_ARITHMETIC = {"+": _add, "-": _sub, "*": _mul, "/": _div}


def _operand(value: Any) -> bool:
    """What arithmetic takes: a tensor or a number."""
    return isinstance(value, Traced) or is_number(value)


def _is_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
    return isinstance(node, ast.Constant) and is_number(node.value)


def maker_over(operands: Iterable[Any]) -> Maker:
    """Where a tensor an expression makes goes: the device of the values it reads (meta in
    the dry run) and their float dtype (the first float tensor's)."""
    tensors = [v.t for v in operands if isinstance(v, Traced)]
    floats = [t for t in tensors if t.is_floating_point()]
    meta = bool(tensors) and tensors[0].is_meta
    dtype = floats[0].dtype if floats else torch.float32
    return Maker(device="meta" if meta else "cpu", dtype=dtype)


def _range_expr(r: range) -> str:
    if r.step != 1:
        return f"torch.arange({r.start}, {r.stop}, {r.step})"
    return f"torch.arange({r.stop})" if r.start == 0 else f"torch.arange({r.start}, {r.stop})"
