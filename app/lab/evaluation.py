"""One evaluation of a formula: its lines' locals, then its result, over the run's `Traced`
operands (meta: the dry run; real: the numbers), each expression by the lab's `Evaluator`
(app/lab/evaluator.py), which asks the evaluation what a name means."""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any

from app.lab.allowlist import NAMESPACES, FormulaError, Pair
from app.lab.evaluator import Evaluator, maker_over
from app.lab.parse import Formula
from app.ops.cancel import check_cancelled
from app.ops.making import Maker
from app.ops.traced import Traced, _merge_steps


class Evaluation:
    """One evaluation of a formula over named `Traced` operands: its lines' locals, then its
    result, each by an `Evaluator` that asks this evaluation what a name means (`Names`)."""

    def __init__(
        self,
        formula: Formula,
        tensors: Mapping[str, Traced],
        grads: Mapping[str, Traced],
        pending: Mapping[str, str],
    ):
        self.formula = formula
        self.tensors = tensors  # the run's tensors, by trace name
        self.grads = grads  # gradients computed before this one, by tensor name
        self.pending = pending  # gradients of the run not available here: name -> why
        self.locals: dict[str, Any] = {}
        self.evaluator = Evaluator(formula.source, self)

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
            value = self.evaluator.eval(node)
            if not isinstance(value, Traced):
                self.locals[name] = value
            elif name != base:  # a local's gradient: defined after the local, as in the code
                self.locals[name] = value.named(name, grad_of=self.locals[base])
            else:
                self.locals[name] = value.named(name)
        value = self.evaluator.eval(self.formula.result)
        if not isinstance(value, Traced):
            raise FormulaError(
                f"{_what(value)}, not a tensor of the gradient's shape", "result_shape"
            )
        # every line runs, used or not: its steps are the formula's cost and its trace
        made = [v.steps for v in self.locals.values() if isinstance(v, Traced)]
        steps = _merge_steps(*made, value.steps, self.evaluator.take_made_steps())
        return Traced(value.t, value.expr, value.prec, steps, value.bindings)

    # ---- what a name means in a formula

    def name(self, node: ast.Name) -> Any:
        if node.id in self.locals:
            return self.locals[node.id]
        if node.id in self.tensors:
            return self.tensors[node.id]
        fail = self.evaluator.fail
        if node.id in NAMESPACES:
            fail(node, f"{node.id} is only for calls such as torch.einsum(...)", "not_allowed")
        names = ", ".join(self.tensors)
        fail(node, f"the run has no tensor or local named {node.id}; it has: {names}", "name")

    def gradient(self, node: ast.Attribute) -> Traced:
        fail = self.evaluator.fail
        if not isinstance(node.value, ast.Name):
            fail(node, ".g is read on a tensor's name, as in l1.g", "not_allowed")
        name = node.value.id
        if f"{name}.g" in self.locals:
            return self.locals[f"{name}.g"]
        if name in self.grads:
            return self.grads[name]
        if name in self.pending:
            fail(node, self.pending[name], "name")
        have = ", ".join(f"{n}.g" for n in self.grads) or "none"
        fail(node, f"the run has no gradient {name}.g; available here: {have}", "name")

    def before_write(self, node: ast.AST, target: ast.expr, value: Any) -> None:
        """An in-place method: a formula never writes."""
        self.evaluator.fail(node, "in-place methods (a trailing _) are not allowed: formulas "
                            "never write", "not_allowed")  # fmt: skip

    def after_write(self, target: ast.expr, value: Any) -> None:
        """Never reached: `before_write` refuses every write."""

    def maker(self) -> Maker:
        return maker_over([*self.tensors.values(), *self.grads.values()])


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
    return Evaluation(formula, tensors, grads, pending or {}).run()


def _what(value: Any) -> str:
    """What a formula gave instead of a tensor, in the learner's words (never a repr)."""
    if isinstance(value, Pair):
        return "the formula gives a pair (values, indices), as .max(dim) does: pick one, e.g. [0]"
    if isinstance(value, tuple):
        return f"the formula gives a tuple of {len(value)}"
    return f"the formula gives the number {value!r}"
