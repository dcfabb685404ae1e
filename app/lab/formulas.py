"""The learner's formulas inside a run: which gradient each replaces, what it may use, and the
422 that names `formulas.<key>` when one cannot run.

A formula for `l1.g` may use every tensor of the run and every gradient the backward pass has
computed before `l1.g` (in the trace's order); its result replaces the built-in `l1.g`, so
everything computed after it (x.g, w1.g, b1.g) is computed from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from app.lab import hints
from app.lab.allowlist import FormulaError
from app.lab.evaluation import evaluate
from app.lab.parse import Formula, parse
from app.ops.traced import Traced
from app.refusal import Refused

GRAD_SUFFIX = ".g"


@dataclass(frozen=True)
class LearnerFormula:
    """A parsed formula bound to its place in the backward pass."""

    formula: Formula
    before: tuple[str, ...]  # the gradients computed before this one: the ones it may use
    after: tuple[str, ...]  # the rest of the run's gradients, this one included

    @property
    def grad(self) -> str:
        return self.formula.grad

    def evaluate(
        self, tensors: Mapping[str, Traced], grads: Mapping[str, Traced], wanted: tuple[int, ...]
    ) -> Traced:
        """The learner's gradient over Traced operands; its shape must be `wanted`."""
        pending = {
            n: f"{n}.g is computed after {self.formula.key} in the backward pass; "
            f"{self.formula.key} may use: {', '.join(f'{b}.g' for b in self.before) or 'none'}"
            for n in self.after
        }
        pending[self.grad] = f"{self.formula.key} is the gradient this formula computes"
        visible = {n: grads[n] for n in self.before if n in grads}
        result = evaluate(self.formula, tensors, visible, pending)
        if result.shape != tuple(wanted):
            broadcasts = [s.as_dict() for s in result.steps if s.action == "broadcast"]
            raise FormulaError(
                hints.result_shape(self.formula.key, result.shape, tuple(wanted), broadcasts),
                "result_shape",
                made=list(result.shape),
                wanted=list(wanted),
            )
        if not result.t.is_floating_point():
            raise FormulaError(
                f"{self.formula.key} must be a float tensor; the formula gives "
                f"{str(result.t.dtype).removeprefix('torch.')} (a mask? multiply it by a "
                "gradient, or add .float())",
                "result_shape",
            )
        return result

    def compute(
        self, env: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """The numbers, on the run's real tensors, in the gradient's own dtype."""
        wanted = env[self.grad]
        tensors = {n: Traced.leaf(t, n) for n, t in env.items()}
        known = {n: Traced.leaf(g, f"{n}{GRAD_SUFFIX}") for n, g in grads.items()}
        try:
            return self.evaluate(tensors, known, tuple(wanted.shape)).t.to(wanted.dtype)
        except FormulaError as err:  # fails on the numbers only: F.one_hot(-target, 3)
            err.key = self.formula.key
            raise


def bind(sources: Mapping[str, str], order: list[str]) -> dict[str, LearnerFormula]:
    """Parse each formula and place it in the backward `order` (the run's gradient names).
    FormulaError (with `.key`) for a formula that cannot run; KeyError for a bad key."""
    bound = {}
    for key, source in sources.items():
        name = key.removesuffix(GRAD_SUFFIX)
        if not key.endswith(GRAD_SUFFIX) or name not in order:
            raise UnknownGradient(key, order)
        try:
            formula = parse(key, source)
        except FormulaError as err:
            err.key = key
            raise
        at = order.index(name)
        bound[name] = LearnerFormula(formula, tuple(order[:at]), tuple(order[at + 1 :]))
    return bound


class UnknownGradient(KeyError):
    def __init__(self, key: str, order: list[str]):
        super().__init__(key)
        self.key = key
        self.valid = [f"{n}{GRAD_SUFFIX}" for n in order]


# --------------------------------------------------------------------------- cost


VIEW_ACTIONS = frozenset({"unsqueeze", "squeeze", "reshape"})  # a reshape that copies: "copy"


def is_view(step: dict) -> bool:
    """A step that makes no new memory: a view (unsqueeze, transpose, expand, basic index)."""
    return step["action"] in VIEW_ACTIONS or step["op"] == "getitem" or bool(step.get("view"))


def _itemsize(step: dict) -> int:
    """Bytes per element of the step's output (4 if it has none)."""
    size = math.prod(step["output"])
    # an in-place write (a program's `x[i] += v`) makes no bytes: count its elements as floats
    return step["bytes"] // size if size and step["bytes"] else 4


def step_work(step: dict) -> int:
    """Elements one step reads or writes: a reduction reads its whole (maybe stretched)
    input; a matmul or einsum reads its operands and writes its output (its multiply-adds
    are `step_flops`); a hidden copy (`temp_bytes`: a stretched operand of @, a transposed
    one of softmax) is written and read once more."""
    if is_view(step):
        return 0
    copied = step.get("temp_bytes", 0) // _itemsize(step)
    if step["action"] in ("matmul", "einsum"):
        return math.prod(step["output"]) + sum(math.prod(s) for s in step["inputs"]) + copied
    if step["action"] == "reduce":
        # var and std pass over their input twice (the mean, then the squares about it):
        # measured, a stretched (20000, 20000) var takes 1.5x a sum's time and more
        passes = 2 if step["op"] in ("var", "std") else 1
        return passes * math.prod(step["inputs"][0])
    return max([math.prod(step["output"]), *(math.prod(s) for s in step["inputs"])]) + copied


def step_flops(step: dict) -> int:
    """Floating-point operations of a matmul or einsum (2 per multiply-add), else 0: these
    run at the BLAS rate, the way the built-in strategies are costed (app/cost/work.py)."""
    if "flops" in step:  # an op that states its own (F.conv2d)
        return step["flops"]
    if step["action"] == "matmul":
        a, _ = step["inputs"]
        return 2 * math.prod(step["output"]) * (a[-1] if a else 1)
    if step["action"] == "einsum":
        return 2 * step.get("index_product", math.prod(step["output"]))
    return 0


def formula_cost(steps: list[dict]) -> tuple[int, int, int]:
    """(bytes, elements of work, flops) of a traced learner formula: every materialized step
    kept (an upper bound of its peak), with the temporaries torch makes inside a step (a
    stretched operand of @ or einsum copied whole, a many-operand einsum's outer product);
    every step's elements read or written; the matmuls' and einsums' flops."""
    held = sum(s["bytes"] + s.get("temp_bytes", 0) for s in steps if not is_view(s))
    return held, sum(map(step_work, steps)), sum(map(step_flops, steps))


# --------------------------------------------------------------------------- errors


def refuse(err: FormulaError | UnknownGradient, sources: Mapping[str, str]) -> None:
    """a Refused (FastAPI's 422 shape), at `["body", "formulas", "<name>.g"]`."""
    if isinstance(err, UnknownGradient):
        raise Refused(
            [
                {
                    "type": "formula_key",
                    "loc": ("body", "formulas", err.key),
                    "msg": f"this network has no gradient {err.key}; its gradients are: "
                    + ", ".join(err.valid),
                    "input": err.key,
                    "ctx": {"valid": err.valid},
                }
            ]
        )
    key = getattr(err, "key", None)
    raise Refused(
        [
            {
                "type": f"formula_{err.kind}",
                "loc": ("body", "formulas", key),
                "msg": str(err),
                "input": sources.get(key, ""),
                "ctx": {"kind": err.kind, **err.details},
            }
        ]
    )
