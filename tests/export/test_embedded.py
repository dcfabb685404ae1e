"""The exported files carry Broadprop's own check code (app/check/tolerance.py,
app/export/witness.py), embedded by `module_body`: the text they run is the code tested here."""

from __future__ import annotations

import ast

import pytest
import torch

from app.check import tolerance
from app.export import witness
from app.export.lines import module_body


def _embedded(module) -> dict:
    """The module's body run on its own, with only what an exported file has before it."""
    namespace = {"torch": torch, "math": __import__("math"), "sys": __import__("sys")}
    exec("\n".join(module_body(tolerance)), namespace)  # our own module's source, not learner text
    if module is not tolerance:
        namespace["explain"] = lambda *args: None
        exec("\n".join(module_body(module)), namespace)
    return namespace


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("noise", [0.0, 1e-3])
def test_the_embedded_compare_is_the_checks_compare(dtype, noise):
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(7, 5, generator=g, dtype=dtype)
    for manual in (reference, reference + 1e-6, 2 * reference, reference.clone().fill_(0)):
        ours = tolerance.compare(manual, reference, 0.0, noise)
        theirs = _embedded(tolerance)["compare"](manual, reference, 0.0, noise)
        assert ours == theirs


def test_the_embedded_modules_import_only_what_the_file_defines():
    """Each embedded module's imports are the file's own (torch, math, sys) or names the
    file defines before it (the tolerance's and the diagnosis's `explain`)."""
    allowed = {"torch", "math", "sys"}
    defined = set(_embedded(tolerance)) | {"explain"}
    for module in (tolerance, witness):
        for node in ast.parse(open(module.__file__).read()).body:
            if isinstance(node, ast.Import):
                assert {a.name for a in node.names} <= allowed, module.__name__
            elif isinstance(node, ast.ImportFrom):
                assert {a.name for a in node.names} <= defined, (module.__name__, node.module)


def _program(scale: float, calls: list):
    def program(dtype):
        calls.append(dtype)
        w = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3).to(dtype)
        return 1.5, {"w": scale * w}, {"w": w}

    return program


@pytest.mark.parametrize("rerun", [True, False])
def test_check_program_passes_a_right_gradient(capsys, rerun):
    calls: list = []
    status = witness.check_program(_program(1.0, calls), torch.float32, rerun, {}, {})
    assert status == 0
    assert calls == ([torch.float32, torch.float64] if rerun else [torch.float32])
    out = capsys.readouterr().out
    assert "loss 1.5" in out and "all 1 written gradients match autograd" in out


def test_check_program_fails_a_doubled_gradient_and_says_why(capsys):
    status = witness.check_program(_program(2.0, []), torch.float32, False, {"w": "dw"}, {})
    assert status == 1
    out = capsys.readouterr().out
    assert "differs from autograd: w" in out
    assert "approximate: False" in out


def test_check_program_names_a_wrong_shape():
    def program(dtype):
        return 0.0, {"w": torch.zeros(3, 2)}, {"w": torch.zeros(2, 3)}

    assert witness.check_program(program, torch.float32, False, {}, {}) == 1
