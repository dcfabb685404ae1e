"""`Op`, the base class every op is made of, with a registry so that adding an op is one
class; `Context`, what its backward may need besides its tensors; `Trail`, the terms one
element of a gradient sums.

The pieces beneath: `Traced` (app/ops/traced.py), the broadcast rule (broadcast.py) and
`unbroadcast` with the other free functions (functional.py), cancellation (cancel.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from app.ops.broadcast import Shape
from app.ops.cancel import RunCancelled
from app.ops.traced import Traced

# --------------------------------------------------------------------------- ops

VARIANT_SEP = ":"


def variant(name: str, label: str) -> str:
    """The key of an extra formula for `name`'s gradient (e.g. `out:fused`): traced and
    checked like the main one, but not propagated."""
    return f"{name}{VARIANT_SEP}{label}"


def split_variant(key: str) -> tuple[str, str | None]:
    """`"out:fused"` -> `("out", "fused")`; `"out"` -> `("out", None)`."""
    name, _, label = key.partition(VARIANT_SEP)
    return name, label or None


@dataclass
class Context:
    """What an op's backward may need besides its tensors: the strategy, the chunk cap, and
    a cancel token (anything with `is_set()`), checked between ops and chunks."""

    strategy: str = "broadcast"
    chunk_bytes: int = 4 << 20
    variants: bool = True  # also compute the other formulas (out:fused); training does not
    skip: frozenset[str] = frozenset()  # gradients nobody needs (training: the data's x.g)
    cancel: Any = None  # anything with is_set(): the run stops at its next check

    def wants(self, key: str) -> bool:
        name, label = split_variant(key)
        return name not in self.skip and (self.variants or label is None)

    def check(self) -> None:
        """Raise RunCancelled if the run should stop (its client left, its deadline passed)."""
        if self.cancel is not None and self.cancel.is_set():
            raise RunCancelled("the run was stopped")


# --------------------------------------------------------------------------- one element


def element(name: str, index: Sequence[int | None]) -> str:
    """`x.g[3, :]` for ("x.g", (3, None)): an element or a slice (None: every entry)."""
    return f"{name}[{', '.join(':' if p is None else str(p) for p in index)}]"


def sum_formula(name: str, index: Sequence[int], at: dict[str, Sequence[int | None]]) -> str:
    """`x.g[3, 100] = (l1.g[3, :] * w1[100, :]).sum()`: an element as the sum of its terms,
    each factor's slice from `at`."""
    terms = terms_expr(at)
    summed = f"({terms}).sum()" if len(at) > 1 else f"{terms}.sum()"
    return f"{element(f'{name}.g', index)} = {summed}"


def terms_expr(at: dict[str, Sequence[int | None]]) -> str:
    """`l1.g[3, :] * w1[100, :]`: the terms themselves, one per entry of the slices."""
    return " * ".join(element(n, i) for n, i in at.items())


@dataclass
class Trail:
    """The terms a gradient's reduction sums into one of its elements: one slice of the
    broadcast product, never the whole. Term t multiplies `factors[name][t]` of every factor;
    the terms run in C order over the summed dims (the `None`s of `slice`)."""

    formula: str  # index filled in: x.g[3, 100] = (l1.g[3, :] * w1[100, :]).sum()
    product_shape: Shape  # the broadcast product the formula reduces, e.g. (1000, 784, 50)
    slice: tuple[int | None, ...]  # the element's slice of it, None where summed: (3, 100, None)
    factors: dict[str, torch.Tensor]  # name -> 1-D, one value per term
    at: dict[str, tuple[int | None, ...]]  # name -> its slice: None where the terms run, in order

    @property
    def summed_shape(self) -> Shape:
        """The sizes of the summed dims: the terms' own shape."""
        return tuple(n for n, i in zip(self.product_shape, self.slice) if i is None)

    def products(self) -> torch.Tensor:
        """Each term's product, in the gradient's dtype, as the formula multiplies them."""
        values = list(self.factors.values())
        out = values[0]
        for factor in values[1:]:
            out = out * factor
        return out

    def term_indices(self, count: int) -> list[list[int]]:
        """The first `count` terms' indices into the broadcast product."""
        summed = self.summed_shape
        free = list(zip(*(i.tolist() for i in torch.unravel_index(torch.arange(count), summed))))
        out = []
        for position in free:
            it = iter(position)
            out.append([next(it) if i is None else i for i in self.slice])
        return out


class Op:
    """One operation of the network: its forward, its manual backward, and its trace.

    Subclasses set `kind` (the registry key), write `forward(*inputs)` and
    `backward(g, *inputs, result=...)` with `Traced` operands, and return from `backward` one
    gradient formula per input that needs a gradient. The formulas are run on meta tensors
    for the trace and on real tensors for the numbers; `compute_backward` may override how
    the numbers are computed (chunked, or by another strategy) as long as they are equal.
    """

    kind: ClassVar[str]
    registry: ClassVar[dict[str, type[Op]]] = {}
    no_grad_inputs: ClassVar[frozenset[int]] = frozenset()  # e.g. a loss's target
    followed: ClassVar[frozenset[int]] = frozenset()  # inputs whose gradient `follow` traces

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            Op.registry[cls.kind] = cls

    def __init__(self, inputs: Sequence[str], output: str, **options: Any):
        self.inputs = tuple(inputs)
        self.output = output
        self.options = options

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.inputs)} -> {self.output})"

    @property
    def grad_inputs(self) -> list[str]:
        """Names of the inputs this op sends a gradient to, in the order it computes them."""
        return [n for i, n in enumerate(self.inputs) if i not in self.no_grad_inputs]

    def forward(self, *xs: Traced) -> Traced:
        raise NotImplementedError

    def backward(
        self, g: Traced | None, *xs: Traced, result: Traced
    ) -> dict[str, Callable[[], Traced]]:
        """Formulas, by input name, each a thunk so each gradient's steps trace separately.

        A key `variant(name, label)` adds another formula for the same gradient: it is
        traced and checked, and the main formula is the one that propagates."""
        raise NotImplementedError

    def follow(
        self, name: str, index: tuple[int, ...], g: torch.Tensor, xs: Sequence[torch.Tensor]
    ) -> Trail:
        """The terms the backward's reduction sums into `name.g[index]` (an input of
        `followed`), from the output's gradient `g` and the inputs `xs`: one slice of them."""
        raise NotImplementedError(f"{self.kind} does not follow {name}.g")

    def compute_forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The output as a tensor; by default the formula of `forward` on real tensors."""
        return self.forward(*(Traced.leaf(x, n) for x, n in zip(xs, self.inputs))).t

    def compute_backward(
        self, g: torch.Tensor | None, xs: Sequence[torch.Tensor], result: torch.Tensor, ctx: Context
    ) -> dict[str, torch.Tensor]:
        """The gradients as tensors; by default, the literal formulas on real tensors."""
        formulas = self.backward(
            None if g is None else Traced.leaf(g, f"{self.output}.g"),
            *(Traced.leaf(x, n) for x, n in zip(xs, self.inputs)),
            result=Traced.leaf(result, self.output),
        )
        return {name: formula().t for name, formula in formulas.items() if ctx.wants(name)}
