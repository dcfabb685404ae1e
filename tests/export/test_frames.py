"""Every function an exported file defines is real code: a module's source (the check, the
reference) or a frame of app/export/frames.py with the file's lines set in as data. No Python
function is kept in a string under app/export (issue 29)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from app.export import frames, witness
from app.export.lines import framed

EXPORT = Path(__file__).resolve().parents[2] / "app" / "export"


def _strings(tree: ast.AST):
    """Every string literal's text, an f-string's literal parts included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


# a line of Python that makes a function: `def f(`, `async def f(`, `class C:`, `lambda x:`
FUNCTION = re.compile(
    r"^\s*(async\s+)?def\s+\w+\s*\(|^\s*class\s+\w+\s*[(:]|\blambda\b[\w\s,*=]*:", re.M
)


def _defines_a_function(text: str) -> bool:
    return FUNCTION.search(text) is not None


def test_no_function_is_kept_in_a_string_under_app_export():
    found = [
        f"{path.name}:{line}: {text[:60]!r}"
        for path in sorted(EXPORT.glob("*.py"))
        for line, text in _strings(ast.parse(path.read_text()))
        if _defines_a_function(text)
    ]
    assert not found


def test_the_scan_sees_a_function_in_a_string():
    source = 'x = "def f(a):\\n    return a"\ny = f"{x}\\ndef g(): pass"\nz = "lambda: w"'
    assert sum(_defines_a_function(t) for _, t in _strings(ast.parse(source))) == 3
    assert not _defines_a_function("# the def of a class of lambdas: no code here")
    assert not _defines_a_function(" class indices")


def _filled_manual_gradients() -> list[str]:
    return framed(
        frames.manual_gradients,
        TENSORS="x, w",
        MANUAL_PASS=["out = x @ w", "w.g = x.T @ out"],
        GRADIENTS='{\n    "w": w.g,\n}',
    )


def test_a_frame_is_its_source_with_the_lines_set_in():
    lines = _filled_manual_gradients()
    assert lines[0] == "def manual_gradients(x, w):"
    assert lines[-5:] == [
        "    out = x @ w",
        "    w.g = x.T @ out",
        "    return {",
        '        "w": w.g,',
        "    }",
    ]
    tree = ast.parse("\n".join(lines))  # a function again, its marks all gone
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not names & set(frames.MARKS)
    assert [n.arg for n in tree.body[0].args.args] == ["x", "w"]


def test_a_mark_left_unfilled_or_filled_twice_is_refused():
    with pytest.raises(ValueError, match="GRADIENTS"):
        framed(frames.manual_gradients, TENSORS="x", MANUAL_PASS=[])
    with pytest.raises(ValueError, match="FORWARD"):
        framed(frames.manual_gradients, TENSORS="x", MANUAL_PASS=[], GRADIENTS="{}", FORWARD=[])
    with pytest.raises(ValueError, match="give it lines"):
        framed(frames.manual_gradients, TENSORS="x", MANUAL_PASS="pass", GRADIENTS="{}")


def test_the_program_frame_keeps_the_learners_blank_lines_and_counts_from_its_backward():
    lines = framed(
        frames.program,
        SEED="0",
        INPUTS=["x = torch.randn(3, generator=g)"],
        LEAVES=["x = x.to(DTYPE).requires_grad_()"],
        FORWARD=["loss = (x * x).sum()"],
        RETAIN=[],
        LOSS="loss",
        AUTOGRAD="{'x': _grad(x)}",
        DETACH=["x = x.detach()"],
        BACKWARD=["", "dx = 2 * x"],
        WRITTEN="{'x': 'dx'}",
    )
    at = lines.index("    try:")
    assert lines[at - 1].startswith("    first = sys._getframe().f_lineno + 2")
    assert lines[at + 1 : at + 3] == ["", "        dx = 2 * x"]  # the backward's line 1 is blank
    assert lines[-1] == "    return loss.item(), manual, autograd"
    assert "    manual = _written(locals(), {'x': 'dx'})" in lines
    ast.parse("\n".join(lines))


def test_written_reads_each_gradient_by_its_name_and_skips_those_never_written():
    w = torch.ones(2)
    w.g = torch.full((2,), 3.0)
    scope = {"w": w, "dx": torch.zeros(1), "b": torch.ones(1)}
    got = witness._written(scope, {"x": "dx", "w": "w.g", "b": "b.g", "y": "dy"})
    assert list(got) == ["x", "w"]
    assert torch.equal(got["w"], w.g) and torch.equal(got["x"], scope["dx"])
