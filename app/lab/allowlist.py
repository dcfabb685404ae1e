"""What a learner's formula may say: the allowlist of node types, operators, names,
attributes, methods, `torch` functions and keyword arguments, and the errors a formula gets.

Each method a formula calls is looked up in these tables (never with `getattr` on a name the
learner typed), and every operand is a `Traced` whose methods are ours and never write in
place. Python numbers are bounded (`MAX_INT`, `MAX_EXPONENT`): `10**10**10` is refused, not
computed.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from app.ops import conv, joining, layers, making
from app.ops.functional import cross_entropy, einsum, filled_like, one_hot, where
from app.ops.traced import COMPARISONS, Traced

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

OPERATORS: dict[type, str] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.MatMult: "@",
    ast.Pow: "**",
    ast.FloorDiv: "//",  # whole numbers only
    ast.Mod: "%",  # whole numbers only
}
COMPARE_OPS: dict[type, str] = {
    ast.Gt: "gt",
    ast.Lt: "lt",
    ast.GtE: "ge",
    ast.LtE: "le",
    ast.Eq: "eq",
    ast.NotEq: "ne",
}
NODES = frozenset(
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
        ast.List,
        *OPERATORS,
        *COMPARE_OPS,
    }
)


@dataclass(frozen=True)
class Method:
    """A tensor method the learner may call: our `Traced` function and its keywords."""

    call: Callable[..., Any]
    keywords: frozenset[str] = field(default_factory=frozenset)
    made: bool = False  # makes a tensor: called with the run's Maker first (device, dtype, draws)
    writes: bool = False  # in place (a trailing _): only on the program's own tensors


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
        if not is_int(dim):
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
        if correction is not None and not is_number(correction):
            raise FormulaError("correction= is a number (1: Bessel's n - 1)", "not_allowed")
        fix = 1 if unbiased is None and correction is None else (
            correction if correction is not None else int(unbiased))  # fmt: skip
        if isinstance(dim, tuple):
            dim = _flat_ints((dim,))
        elif dim is not None and not is_int(dim):
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
    if not isinstance(index, Traced) or not is_int(num_classes) or num_classes < 1:
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
    if not (is_int(dim) and isinstance(index, Traced) and isinstance(source, Traced)):
        raise FormulaError(".index_add(dim, index, source): a dim and two tensors",
                           "not_allowed")  # fmt: skip
    if index.ndim != 1 or index.t.is_floating_point():
        raise FormulaError(
            f".index_add takes a 1-D integer index; got {_shape(index.shape)} (flatten it with "
            ".view(-1), and the source to match)",
            "shape",
        )
    if not is_number(alpha):
        raise FormulaError("alpha= is a number", "not_allowed")
    return x.index_add(dim, index, source, alpha)


def _binary_tensor(name: str) -> Callable[..., Traced]:
    def call(a: Any, b: Any) -> Traced:
        if not (isinstance(a, Traced) and isinstance(b, Traced)):
            raise FormulaError(f"torch.{name} takes two tensors", "not_allowed")
        return getattr(a, name)(b)

    return call


def _sized(name: str, value: float) -> Callable[..., Traced]:
    """`torch.zeros(2, 3)`, `torch.ones((2, 3))`, `torch.empty(x.shape)`."""

    def call(maker: making.Maker, *sizes: Any, dtype: Any = None) -> Traced:
        return making.filled(maker, name, making.sizes_of(sizes, f"torch.{name}"), value,
                             _dtype(dtype))  # fmt: skip

    return call


def _full(maker: making.Maker, size: Any, fill_value: Any, dtype: Any = None) -> Traced:
    if not is_number(fill_value) and not isinstance(fill_value, bool):
        raise FormulaError("torch.full(size, value): the value is a number", "not_allowed")
    return making.full(maker, making.sizes_of((size,), "torch.full"), fill_value, _dtype(dtype))


def _drawn(name: str) -> Callable[..., Traced]:
    def call(maker: making.Maker, *sizes: Any) -> Traced:
        return making.drawn(maker, name, making.sizes_of(sizes, f"torch.{name}"))

    return call


def _dropout(maker: making.Maker, x: Any, p: Any = 0.5, training: Any = True,
             inplace: Any = False) -> Traced:  # fmt: skip
    if not isinstance(x, Traced) or not x.t.is_floating_point():
        raise FormulaError("F.dropout takes a float tensor", "not_allowed")
    if not is_number(p) or not 0 <= p <= 1:
        raise FormulaError("F.dropout's p is a probability, from 0 to 1", "not_allowed")
    if not isinstance(training, bool) or inplace is not False:
        raise FormulaError("F.dropout takes training=True/False (and never inplace=True)",
                           "not_allowed")  # fmt: skip
    return making.dropout(maker, x, p, training)


def _triangle(upper: bool) -> Callable[..., Traced]:
    def call(x: Any, diagonal: Any = 0) -> Traced:
        if not isinstance(x, Traced) or not is_int(diagonal):
            raise FormulaError("torch.tril / triu(x, diagonal=k): a tensor and a whole number",
                               "not_allowed")  # fmt: skip
        return making.triangle(x, upper, diagonal)

    return call


def _dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    raise FormulaError("dtype= is a torch dtype, e.g. torch.long", "not_allowed")


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
    "pow": Method(lambda x, exponent: x.pow(literal_exponent(exponent)), _kw("exponent")),
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
    # v4: masks, the chapters after the MLP, and writes into the program's own tensors
    "masked_fill": Method(layers.masked_fill, _kw("mask", "value")),
    "argmax": Method(
        lambda x, dim=None, keepdim=False: layers.arg_extreme(x, "argmax", dim, keepdim), _REDUCE
    ),
    "argmin": Method(
        lambda x, dim=None, keepdim=False: layers.arg_extreme(x, "argmin", dim, keepdim), _REDUCE
    ),
    "tril": Method(_triangle(False), _kw("diagonal")),
    "triu": Method(_triangle(True), _kw("diagonal")),
    "split": Method(joining.split, _kw("split_size", "dim")),
    "chunk": Method(joining.chunk, _kw("chunks", "dim")),
    "bool": Method(lambda x: layers.cast(x, torch.bool)),
    "long": Method(lambda x: layers.cast(x, torch.int64)),
    "contiguous": Method(layers.contiguous),
    "scatter_add": Method(layers.scatter_add, _kw("dim", "index", "src")),
    "index_put": Method(layers.index_put, _kw("indices", "values", "accumulate")),
    "index_add_": Method(
        lambda *a, **k: layers.index_add(*a, **k, in_place=True),
        _kw("dim", "index", "source", "alpha"),
        writes=True,
    ),
    "scatter_add_": Method(
        lambda *a, **k: layers.scatter_add(*a, **k, in_place=True),
        _kw("dim", "index", "src"),
        writes=True,
    ),
    "index_put_": Method(
        lambda *a, **k: layers.index_put(*a, **k, in_place=True),
        _kw("indices", "values", "accumulate"),
        writes=True,
    ),
    "masked_fill_": Method(
        lambda *a, **k: layers.masked_fill(*a, **k, in_place=True),
        _kw("mask", "value"),
        writes=True,
    ),
}
# methods of a list (`hs = []`): Python's own
LIST_METHODS: dict[str, Method] = {"append": Method(joining.append)}
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
                 "max", "min", "amax", "amin", "masked_fill", "argmax", "argmin", "tril",
                 "triu", "split", "chunk", "index_add", "scatter_add")  # fmt: skip
TORCH_FUNCTIONS: dict[str, Method] = {
    "where": Method(where),
    "einsum": Method(lambda equation, *ops: einsum(equation, *_flat_traced(ops))),
    "matmul": Method(lambda a, b: a @ b),
    "ones_like": Method(lambda x: filled_like(x, 1.0)),
    "zeros_like": Method(lambda x: filled_like(x, 0.0)),
    "maximum": Method(_binary_tensor("maximum")),
    "minimum": Method(_binary_tensor("minimum")),
    **{name: METHODS[name] for name in _AS_FUNCTIONS},
    # tensors a program makes: on the run's device, in its dtype, drawn from its generator
    "zeros": Method(_sized("zeros", 0.0), _kw("dtype"), made=True),
    "ones": Method(_sized("ones", 1.0), _kw("dtype"), made=True),
    "empty": Method(_sized("empty", 0.0), _kw("dtype"), made=True),
    "full": Method(_full, _kw("size", "fill_value", "dtype"), made=True),
    "eye": Method(
        lambda maker, n, m=None, dtype=None: making.eye(maker, n, m, _dtype(dtype)),
        _kw("dtype"),
        made=True,
    ),
    "arange": Method(
        lambda maker, *a, dtype=None: making.arange(maker, *a, dtype=_dtype(dtype)),
        _kw("dtype"),
        made=True,
    ),
    "rand": Method(_drawn("rand"), made=True),
    "randn": Method(_drawn("randn"), made=True),
    "cat": Method(joining.cat, _kw("dim")),
    "concat": Method(joining.cat, _kw("dim")),
    "stack": Method(joining.stack, _kw("dim")),
}


# torch.nn.functional, as the built-in code writes it (`F.one_hot(target, 10)`)
FUNCTIONAL: dict[str, Method] = {
    "one_hot": Method(_one_hot, _kw("num_classes")),
    "softmax": METHODS["softmax"],
    "log_softmax": METHODS["log_softmax"],
    "cross_entropy": Method(_cross_entropy, _kw("reduction")),
    "relu": METHODS["relu"],
    "gelu": Method(layers.gelu, _kw("approximate")),
    "layer_norm": Method(layers.layer_norm, _kw("normalized_shape", "weight", "bias", "eps")),
    "embedding": Method(layers.embedding),
    "dropout": Method(_dropout, _kw("p", "training", "inplace"), made=True),
    "unfold": Method(conv.unfold, _kw("kernel_size", "dilation", "padding", "stride")),
    "fold": Method(conv.fold, _kw("output_size", "kernel_size", "dilation", "padding", "stride")),
    "pad": Method(conv.pad, _kw("pad", "mode", "value")),
    "conv2d": Method(conv.conv2d, _kw("weight", "bias", "stride", "padding", "dilation", "groups")),
    "max_pool2d": Method(
        conv.max_pool2d,
        _kw("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    ),
    "avg_pool2d": Method(
        conv.avg_pool2d, _kw("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
    ),
    "tanh": METHODS["tanh"],
    "sigmoid": METHODS["sigmoid"],
}
KEYWORD_ALIASES = {"keepdims": "keepdim"}  # numpy's spelling, which torch accepts too
MAX_RANGE = 1 << 20  # range(n) / torch.arange(n) as an index


def _math(name: str) -> Callable[[Any], float]:
    def call(value: Any) -> float:
        if not is_number(value):
            raise FormulaError(f"math.{name} takes a number (a tensor's: torch.{name})",
                               "not_allowed")  # fmt: skip
        try:
            return float(getattr(math, name)(value))
        except (ValueError, OverflowError) as err:
            raise FormulaError(f"math.{name}({value!r}): {err}", "not_allowed") from None

    return call


# Python's math on plain numbers, as nanoGPT scales attention: 1.0 / math.sqrt(k.size(-1))
MATH: dict[str, Method] = {name: Method(_math(name)) for name in ("sqrt", "log", "exp")}
MATH_CONSTANTS = {"pi": math.pi, "e": math.e, "inf": math.inf}
NAMESPACES = {"torch": TORCH_FUNCTIONS, "F": FUNCTIONAL, "math": MATH}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float": torch.float32,
          "double": torch.float64, "long": torch.int64, "int64": torch.int64,
          "bool": torch.bool}  # fmt: skip
# Python's own functions a program calls (`len(x)`, `float('-inf')`, `reversed(range(T))`)
BUILTINS = frozenset({"range", "len", "float", "int", "reversed"})


def _flat_ints(args: tuple) -> tuple[int, ...]:
    """`reshape(2, 3)` and `reshape((2, 3))` alike."""
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = tuple(args[0])
    if not all(is_int(a) for a in args):
        raise FormulaError("sizes and dims must be whole numbers", "not_allowed")
    return args


def _flat_traced(args: tuple) -> tuple[Traced, ...]:
    if not args or not all(isinstance(a, Traced) for a in args):
        raise FormulaError("torch.einsum takes its equation, then tensors", "not_allowed")
    return args


def literal_exponent(value: Any) -> float:
    if not is_number(value) or abs(value) > MAX_EXPONENT:
        raise FormulaError(
            f"an exponent must be a number between -{MAX_EXPONENT} and {MAX_EXPONENT}",
            "not_allowed",
        )
    return value


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
