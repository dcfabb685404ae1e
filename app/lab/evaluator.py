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
from app.ops.broadcast import BroadcastError, broadcast_rule
from app.ops.cancel import check_cancelled
from app.ops.functional import arange, cross_entropy, einsum, filled_like, one_hot, where
from app.ops.traced import COMPARISONS, Traced, _merge_steps

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


class Pair(tuple):
    """What `x.max(dim)` / `x.min(dim)` give in PyTorch: (values, indices), readable as
    `.values` / `.indices`, `[0]` / `[1]`, or unpacked."""

    @property
    def values(self) -> Traced:
        return self[0]

    @property
    def indices(self) -> Traced:
        return self[1]


def _extreme(op: str) -> Callable[..., Any]:
    """`x.max()`: the largest entry; `x.max(dim)`: the pair (values, indices), as torch."""

    def call(x: Traced, dim: int | None = None, keepdim: bool = False) -> Any:
        if dim is None:
            if keepdim:
                raise FormulaError(f".{op}() without a dim takes no keepdim", "not_allowed")
            return getattr(x, op)()
        if not _is_int(dim):
            raise FormulaError(f".{op}(dim) takes one whole-number dim", "not_allowed")
        return Pair(getattr(x, f"{op}_pair")(dim, keepdim))

    return call


def _spread(op: str) -> Callable[..., Any]:
    """`var`/`std` with `unbiased=` (True: n - 1) or `correction=` (n - correction), as torch."""

    def call(x: Traced, dim: Any = None, keepdim: bool = False, unbiased: Any = None,
             correction: Any = None) -> Traced:  # fmt: skip
        if unbiased is not None and correction is not None:
            raise FormulaError(f".{op}() takes unbiased= or correction=, not both", "not_allowed")
        if unbiased is not None and not isinstance(unbiased, bool):
            raise FormulaError("unbiased= is True or False", "not_allowed")
        if correction is not None and not _is_number(correction):
            raise FormulaError("correction= is a number (1: Bessel's n - 1)", "not_allowed")
        fix = 1 if unbiased is None and correction is None else (
            correction if correction is not None else int(unbiased))  # fmt: skip
        if isinstance(dim, tuple):
            dim = _flat_ints((dim,))
        elif dim is not None and not _is_int(dim):
            raise FormulaError(f".{op}(dim): dim is a whole number or a tuple of them",
                               "not_allowed")  # fmt: skip
        return getattr(x, op)(dim, keepdim, fix)

    return call


def _one_hot(index: Any, num_classes: Any = None) -> Traced:
    if num_classes is None:
        raise FormulaError(
            "F.one_hot needs its number of classes, as F.one_hot(target, num_classes=10): "
            "without it PyTorch reads the largest index in the data",
            "not_allowed",
        )
    if not isinstance(index, Traced) or not _is_int(num_classes) or num_classes < 1:
        raise FormulaError(
            "F.one_hot(indices, num_classes) takes an integer tensor and a whole number of "
            "classes, at least 1 (the memory budget bounds how many)",
            "not_allowed",
        )
    if index.t.is_floating_point():
        raise FormulaError("F.one_hot takes an integer tensor of class indices", "not_allowed")
    return one_hot(index, num_classes)


def _cross_entropy(logits: Any, target: Any, reduction: str = "mean") -> Traced:
    if not (isinstance(logits, Traced) and isinstance(target, Traced)):
        raise FormulaError("F.cross_entropy(logits, target) takes two tensors", "not_allowed")
    if reduction not in ("mean", "sum", "none"):
        raise FormulaError("reduction= is 'mean', 'sum' or 'none'", "not_allowed")
    if target.t.is_floating_point() or target.ndim != logits.ndim - 1:
        raise FormulaError(
            f"F.cross_entropy here takes class indices: logits {_shape(logits.shape)} and an "
            f"integer target of shape {_shape(logits.shape[:1] + logits.shape[2:])}; "
            f"got {_shape(target.shape)}",
            "shape",
        )
    return cross_entropy(logits, target, reduction)


def _index_add(x: Traced, dim: Any, index: Any, source: Any, alpha: Any = 1) -> Traced:
    if not (_is_int(dim) and isinstance(index, Traced) and isinstance(source, Traced)):
        raise FormulaError(".index_add(dim, index, source): a dim and two tensors",
                           "not_allowed")  # fmt: skip
    if index.ndim != 1 or index.t.is_floating_point():
        raise FormulaError(
            f".index_add takes a 1-D integer index; got {_shape(index.shape)} (flatten it with "
            ".view(-1), and the source to match)",
            "shape",
        )
    if not _is_number(alpha):
        raise FormulaError("alpha= is a number", "not_allowed")
    return x.index_add(dim, index, source, alpha)


def _binary_tensor(name: str) -> Callable[..., Traced]:
    def call(a: Any, b: Any) -> Traced:
        if not (isinstance(a, Traced) and isinstance(b, Traced)):
            raise FormulaError(f"torch.{name} takes two tensors", "not_allowed")
        return getattr(a, name)(b)

    return call


def _shape(shape: tuple) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


_REDUCE = _kw("dim", "keepdim")
METHODS: dict[str, Method] = {
    "unsqueeze": Method(Traced.unsqueeze, _kw("dim")),
    "squeeze": Method(Traced.squeeze, _kw("dim")),
    "sum": Method(Traced.sum, _REDUCE),
    "mean": Method(Traced.mean, _REDUCE),
    "max": Method(_extreme("max"), _REDUCE),
    "min": Method(_extreme("min"), _REDUCE),
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
    "var": Method(_spread("var"), _kw("dim", "keepdim", "unbiased", "correction")),
    "std": Method(_spread("std"), _kw("dim", "keepdim", "unbiased", "correction")),
    "clone": Method(Traced.clone),
    "relu": Method(Traced.relu),
    "index_add": Method(_index_add, _kw("dim", "index", "source", "alpha")),
    **{op: Method(lambda x, other, op=op: x.compare(op, other)) for op in COMPARISONS},
}
# attributes read without a call
ATTRIBUTES: dict[str, Callable[[Traced], Any]] = {
    "T": lambda x: x.T,
    "shape": lambda x: x.shape,
    "ndim": lambda x: x.ndim,
}
PAIR_ATTRIBUTES = ("values", "indices")  # of the pair `.max(dim)` / `.min(dim)` give
# `torch.exp(x)` is `x.exp()`: these functions are the methods of the same name
_AS_FUNCTIONS = ("exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "abs", "softmax",
                 "log_softmax", "sum", "mean", "clamp", "relu", "var", "std", "clone",
                 "max", "min", "amax", "amin")  # fmt: skip
TORCH_FUNCTIONS: dict[str, Method] = {
    "where": Method(where),
    "einsum": Method(lambda equation, *ops: einsum(equation, *_flat_traced(ops))),
    "matmul": Method(lambda a, b: a @ b),
    "ones_like": Method(lambda x: filled_like(x, 1.0)),
    "zeros_like": Method(lambda x: filled_like(x, 0.0)),
    "maximum": Method(_binary_tensor("maximum")),
    "minimum": Method(_binary_tensor("minimum")),
    "arange": Method(lambda end: end),  # made in `_Call`, on the run's device
    **{name: METHODS[name] for name in _AS_FUNCTIONS},
}


# torch.nn.functional, as the built-in code writes it (`F.one_hot(target, 10)`)
FUNCTIONAL: dict[str, Method] = {
    "one_hot": Method(_one_hot, _kw("num_classes")),
    "softmax": METHODS["softmax"],
    "log_softmax": METHODS["log_softmax"],
    "cross_entropy": Method(_cross_entropy, _kw("reduction")),
    "relu": METHODS["relu"],
}
KEYWORD_ALIASES = {"keepdims": "keepdim"}  # numpy's spelling, which torch accepts too
MAX_RANGE = 1 << 20  # range(n) / torch.arange(n) as an index
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


def _check_tree(
    tree: ast.AST,
    source: str,
    nodes: frozenset[type] = _NODES,
    max_nodes: int = MAX_NODES,
    program: bool = False,
) -> None:
    """Every node, iteratively (a deep tree cannot overflow our stack), against the allowlist,
    in source order: with several bad lines, the first one is named."""
    stack: list[tuple[ast.AST, int]] = [(tree, 0)]
    count = 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > max_nodes:
            raise FormulaError(f"the text has over {max_nodes} parts; simplify it", "too_long")
        if depth > MAX_DEPTH:
            raise FormulaError(f"the text nests over {MAX_DEPTH} levels deep", "too_long")
        if type(node) not in nodes:
            raise FormulaError(_not_allowed_message(node, source, program), "not_allowed")
        _check_node(node, source, program)
        children = list(ast.iter_child_nodes(node))
        stack.extend((child, depth + 1) for child in reversed(children))


def _check_node(node: ast.AST, source: str, program: bool = False) -> None:
    if isinstance(node, ast.Name) and node.id.startswith("_"):
        raise FormulaError(f"`{node.id}`: names starting with _ are not allowed", "not_allowed")
    if isinstance(node, ast.Attribute):
        if node.attr.startswith("_"):
            raise FormulaError(
                f"`{_segment(source, node)}`: private and dunder attributes are not allowed",
                "not_allowed",
            )
        if isinstance(node.value, ast.Name) and node.value.id in NAMESPACES:
            space = node.value.id
            if node.attr not in NAMESPACES[space] and not (
                space == "torch" and node.attr in DTYPES
            ):
                allowed = ", ".join(f"{space}.{n}" for n in NAMESPACES[space])
                raise FormulaError(
                    f"`{_segment(source, node)}` is not allowed; allowed: {allowed}", "not_allowed"
                )
        allowed = {"g", *METHODS, *ATTRIBUTES, *PAIR_ATTRIBUTES, *TORCH_FUNCTIONS, *FUNCTIONAL,
                   *DTYPES}  # fmt: skip
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
    if program:
        return  # a program's statements are checked by app.lab.statements
    if isinstance(node, ast.Assign) and not (
        _single_name_target(node) or (len(node.targets) == 1 and _is_grad(node.targets[0]))
    ):
        if any(isinstance(t, ast.Subscript) for t in node.targets):
            raise FormulaError(
                f"`{_segment(source, node)}`: indexed assignment is for programs (POST "
                "/api/program, the page's /program); in a formula, build the tensor at once, "
                "e.g. `probs - F.one_hot(target, num_classes=probs.shape[-1])` for "
                "`d = probs; d[range(n), target] -= 1`",
                "not_allowed",
            )
        raise FormulaError(f"`{_segment(source, node)}`: assign to one plain name", "not_allowed")


def _not_allowed_message(node: ast.AST, source: str, program: bool = False) -> str:
    what, advice = _REFUSED.get(type(node), (type(node).__name__, ""))
    where = "a program" if program else "a formula"
    if not program and isinstance(node, ast.AugAssign):
        advice = (
            "write `x = x + ...`, or write the whole backward as a program (POST /api/program, "
            "the page's /program), where `+=` accumulates as in a notebook"
        )
    segment = _segment(source, node)
    prefix = f"`{segment}`: " if segment and len(segment) <= 80 else ""
    return f"{prefix}{what} not allowed in {where}" + (f": {advice}" if advice else "")


# node type -> (what it is, what to write instead)
_REFUSED: dict[type, tuple[str, str]] = {
    ast.Import: ("imports are", ""),
    ast.ImportFrom: ("imports are", ""),
    ast.Lambda: ("lambdas are", ""),
    ast.ListComp: ("comprehensions are", ""),
    ast.SetComp: ("comprehensions are", ""),
    ast.DictComp: ("comprehensions are", ""),
    ast.GeneratorExp: ("generators are", ""),
    ast.JoinedStr: ("f-strings are", ""),
    ast.AugAssign: ("in-place assignment (`+=` and the like) is", ""),
    ast.For: ("a loop is", "programs loop with `for i in range(n):` (POST /api/program)"),
    ast.While: ("`while` is", "a program loops only with `for i in range(n):`"),
    ast.NamedExpr: ("`:=` is", ""),
    ast.IfExp: ("`x if c else y` is", "use torch.where(c, x, y)"),
    ast.BoolOp: ("`and` / `or` are", "use a mask, e.g. (a > 0) * (b > 0)"),
}


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
            check_cancelled()  # between lines (and after every op, in Traced._make)
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
        return getattr(self, handler)(node)

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
            self._pair_misused(node)
        if node.attr not in ATTRIBUTES or not isinstance(value, Traced):
            self.fail(node, f".{node.attr} must be called, on a tensor", "not_allowed")
        return self._apply(node, ATTRIBUTES[node.attr], value)

    def _pair_misused(self, node: ast.AST) -> None:
        self.fail(
            node,
            "x.max(dim) and x.min(dim) give (values, indices), as in PyTorch: take "
            "x.max(dim).values (or x.amax(dim)) for the numbers",
            "not_allowed",
        )

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
        if isinstance(left, Pair) or isinstance(right, Pair):
            self._pair_misused(node)
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
        index = self._index(node.slice)
        parts = index if isinstance(index, tuple) else (index,)
        if isinstance(value, Pair):  # (values, indices)[0]
            if not _is_int(index) or index not in (0, 1, -1, -2):
                self.fail(node, "(values, indices) is indexed by 0 or 1", "not_allowed")
            return value[index]
        if any(isinstance(p, (Traced, range)) for p in parts):
            if not isinstance(value, Traced):
                self.fail(node, "only tensors are indexed by tensors", "not_allowed")
            return self._apply(node, self._advanced_index, value, parts)
        if not all(p is None or p is Ellipsis or _is_int(p) or isinstance(p, slice) for p in parts):
            self.fail(node, "index with whole numbers, slices, None, ... and tensors only",
                      "not_allowed")  # fmt: skip
        if isinstance(value, tuple):  # a shape
            if not _is_int(index):
                self.fail(node, "a shape is indexed by one whole number", "not_allowed")
            return self._apply(node, lambda v: v[index], value)
        if not isinstance(value, Traced):
            self.fail(node, "only tensors and shapes can be indexed", "not_allowed")
        return self._apply(node, lambda v: v[index], value)

    def _index(self, node: ast.AST) -> Any:
        """An index: a tuple's parts may be tensors and ranges (`logprobs[range(n), Yb]`)."""
        if isinstance(node, ast.Tuple):
            return tuple(self.eval(e) for e in node.elts)
        return self.eval(node)

    def _advanced_index(self, value: Traced, parts: tuple) -> Traced:
        """Indexing with tensors as torch does it; `range(n)` is `torch.arange(n)`."""
        converted = []
        for p in parts:
            if isinstance(p, range):
                if p.step != 1 or p.start != 0:
                    raise FormulaError("index with range(n) (from 0, step 1)", "not_allowed")
                p = arange(p.stop, value.t)
            elif isinstance(p, Traced) and p.t.is_floating_point():
                raise FormulaError(
                    "a float tensor cannot index: indices are integer (or bool mask) tensors",
                    "not_allowed",
                )
            elif not (p is None or p is Ellipsis or _is_int(p) or isinstance(p, (slice, Traced))):
                raise FormulaError("index with whole numbers, slices, None, ... and tensors",
                                   "not_allowed")  # fmt: skip
            converted.append(p)
        return value.index_with(tuple(converted))

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
        if isinstance(func, ast.Name) and func.id == "range":
            return self._range(node)
        if not isinstance(func, ast.Attribute):
            self.fail(node, "only tensor methods, torch.<function>, F.<function> and range(n) "
                      "can be called", "not_allowed")  # fmt: skip
        if (
            isinstance(func.value, ast.Name)
            and func.value.id == "torch"
            and func.attr == "arange"
            and func.value.id not in getattr(self, "locals", {})
        ):
            return self._range(node, tensor=True)
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
            if isinstance(value, Pair):
                self._pair_misused(node)
            if not isinstance(value, Traced):
                self.fail(node, f".{func.attr}() is called on a tensor", "not_allowed")
            receiver = (value,)
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
        return self._apply(node, method.call, *receiver, *args, **kwargs)

    def _range(self, node: ast.Call, tensor: bool = False) -> Any:
        """`range(n)` (a Python range: a loop's or an index's) and `torch.arange(n)`."""
        name = "torch.arange" if tensor else "range"
        if node.keywords or not 1 <= len(node.args) <= (1 if tensor else 3):
            self.fail(node, f"{name} takes {'n' if tensor else 'n, or start, stop[, step]'}",
                      "not_allowed")  # fmt: skip
        args = [self.eval(a) for a in node.args]
        if not all(_is_int(a) for a in args):
            self.fail(node, f"{name} takes whole numbers (a shape's size: x.shape[0])",
                      "not_allowed")  # fmt: skip
        if len(args) == 3 and args[2] == 0:
            self.fail(node, "range's step cannot be 0", "not_allowed")
        r = range(*args)
        if len(r) > MAX_RANGE:
            self.fail(node, f"{name} of {len(r)} numbers; at most {MAX_RANGE}", "budget")
        if tensor:
            return arange(r.stop, self.device())
        return r

    def device(self) -> torch.Tensor:
        """A tensor on the run's device (meta in the dry run), for what a formula makes."""
        for value in (*self.tensors.values(), *self.grads.values()):
            if isinstance(value, Traced):
                return value.t
        return torch.empty(0)

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


# node type -> the method that evaluates it (looked up on the instance, so a subclass such
# as app.lab.statements.Interpreter can say what a name means)
_HANDLERS: dict[type, str] = {
    node: f"_{node.__name__}"
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
        ast.Call,
    )  # fmt: skip
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
