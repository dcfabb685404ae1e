"""The expression evaluator serves both a formula and a program's lines by composition: it
asks whoever runs it what a name means (`Names`), and nobody subclasses it or fakes its
fields (issue 29)."""

from __future__ import annotations

import ast

import pytest
import torch

from app.lab.allowlist import FormulaError
from app.lab.evaluation import Evaluation
from app.lab.evaluator import Evaluator, maker_over
from app.lab.parse import parse
from app.lab.statements import Interpreter, parse_program
from app.ops.making import Maker
from app.ops.traced import Traced


class Table:
    """The least a runner gives the evaluator: names from a dict, gradients from another."""

    def __init__(self, values: dict, grads: dict):
        self.values, self.grads, self.writes = values, grads, []

    def name(self, node: ast.Name):
        return self.values[node.id]

    def gradient(self, node: ast.Attribute):
        return self.grads[node.value.id]

    def before_write(self, node, target, value):
        self.writes.append(("before", ast.unparse(target)))

    def after_write(self, target, value):
        self.writes.append(("after", ast.unparse(target)))

    def maker(self) -> Maker:
        return Maker(device="cpu", dtype=torch.float64)


def _evaluate(source: str, names: Table):
    return Evaluator(source, names).eval(ast.parse(source, mode="eval").body)


def test_the_evaluator_reads_names_and_gradients_from_its_runner():
    a = Traced(torch.tensor([1.0, 2.0]), "a")
    out = _evaluate("a * 2 + a.g", Table({"a": a}, {"a": Traced(torch.ones(2), "a.g")}))
    assert torch.equal(out.t, torch.tensor([3.0, 5.0]))
    made = _evaluate("torch.zeros(3)", Table({}, {}))  # made where the runner says
    assert made.t.dtype == torch.float64


def test_the_evaluator_asks_its_runner_before_and_after_a_write():
    d = Traced(torch.zeros(3), "d")
    names = Table({"d": d, "m": Traced(torch.tensor([True, False, True]), "m")}, {})
    _evaluate("d.masked_fill_(m, 1.0)", names)
    assert names.writes == [("before", "d"), ("after", "d")]
    assert torch.equal(d.t, torch.tensor([1.0, 0.0, 1.0]))


def test_a_formula_refuses_a_write_through_its_names():
    x = Traced(torch.ones(3), "x")
    with pytest.raises(FormulaError, match="in-place methods"):
        Evaluation(parse("x.g", "x.masked_fill_(x > 0, 0.0)"), {"x": x}, {}, {}).run()


def test_the_interpreter_owns_an_evaluator_and_is_not_one():
    assert not issubclass(Interpreter, Evaluator) and not issubclass(Interpreter, Evaluation)
    program = parse_program("y = x * 3\ny += 1", "forward")
    interp = Interpreter(program, {"x": Traced(torch.ones(2), "x")}, [])
    assert interp.evaluator.names is interp
    assert not {"locals", "tensors", "grads", "pending"} & set(vars(interp))
    interp.run()
    assert torch.equal(interp.scope["y"].t, torch.full((2,), 4.0))
    assert [e.target for e in interp.executed.values()] == ["y", "y"]


def test_where_a_made_tensor_goes_follows_the_values_read():
    meta = Traced(torch.empty(2, device="meta", dtype=torch.float64), "m")
    assert maker_over([3, meta]) == Maker(device="meta", dtype=torch.float64)
    assert maker_over([]) == Maker(device="cpu", dtype=torch.float32)
