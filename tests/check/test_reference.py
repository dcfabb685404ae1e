"""One reference (issue 23): the contract's forward is written once, in app/check/reference.py.
The autograd check, the finite differences and training's check run it (a wrong reference makes
each of them fail), the exported file carries its functions' own source, and the manual side
(app/engine/network.py, app/ops) never imports it."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pytest
import torch

from app.check import reference
from app.check.autograd import autograd_check, autograd_gradients, reference_loss
from app.check.fd import finite_difference_check
from app.engine.network import Network
from app.engine.tensors import make_tensors
from app.export import run as export
from app.export.checking import REFERENCE_FUNCTIONS
from app.ops import Context
from app.runs import train
from app.schemas import RunRequest

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(batch=6, in_features=5, hidden=[4, 3], out_features=2, activation="tanh", seed=4)


def _run(**fields):
    cfg = RunRequest(**{**SMALL, **fields})
    tensors = make_tensors(cfg)
    net = Network.from_config(cfg)
    return cfg, tensors, net.backward(net.forward(tensors), Context())


def _off_by_a_third(monkeypatch, name: str) -> None:
    """Make one reference function wrong (its result scaled by 4/3): a check that ran its own
    copy of the network would not notice."""
    right = getattr(reference, name)
    monkeypatch.setattr(reference, name, lambda *args, **kw: right(*args, **kw) * (4 / 3))


@pytest.mark.parametrize("norm", ["none", "layernorm", "batchnorm"])
def test_the_reference_forward_is_the_contracts_loss(norm):
    """reference.forward's stages are the manual forward's own tensors, up to rounding."""
    cfg = RunRequest(**{**SMALL, "norm": norm, "dtype": "float64"})
    tensors = make_tensors(cfg)
    env = Network.from_config(cfg).forward(tensors)
    stages: dict[str, torch.Tensor] = {}
    loss = reference.forward(cfg, tensors, stages)
    torch.testing.assert_close(loss, env["loss"])
    hidden = [
        f"{kind}{k}" for k in (1, 2) for kind in ("l", *(["n"] if norm != "none" else []), "a")
    ]
    assert list(stages) == [*hidden, "out"]
    for name, t in stages.items():
        torch.testing.assert_close(t, env[name])


@pytest.mark.parametrize("name", ["forward", "activation", "linear"])
def test_the_autograd_check_runs_the_reference(monkeypatch, name):
    cfg, tensors, manual = _run()
    assert autograd_check(cfg, tensors, manual)["all_close"]
    _off_by_a_third(monkeypatch, name)
    assert not autograd_check(cfg, tensors, manual)["all_close"]


@pytest.mark.parametrize("name", ["loss_of", "activation", "normalize"])
def test_the_finite_differences_run_the_reference(monkeypatch, name):
    cfg, tensors, manual = _run(norm="layernorm", fd_samples=4)
    assert all(e["allclose"] for e in finite_difference_check(cfg, tensors, manual).values())
    _off_by_a_third(monkeypatch, name)
    report = finite_difference_check(cfg, tensors, manual)
    assert not all(e["allclose"] for e in report.values()), report


def test_trainings_check_runs_the_reference(monkeypatch):
    cfg, tensors, manual = _run(dtype="float64")
    params = {n: t for n, t in tensors.items() if n not in ("x", "target")}
    assert train.check(cfg, tensors, manual, params)["all_close"]
    _off_by_a_third(monkeypatch, "forward")
    assert not train.check(cfg, tensors, manual, params)["all_close"]


def test_reference_loss_keeps_every_stage_with_its_gradient():
    cfg, tensors, _ = _run(norm="batchnorm")
    inter: dict[str, torch.Tensor] = {}
    autograd_gradients(cfg, tensors, inter)
    assert sorted(inter) == sorted(["l1", "n1", "a1", "l2", "n2", "a2", "out"])
    leaves = {n: t.detach().requires_grad_(n != "target") for n, t in tensors.items()}
    assert reference_loss(cfg, leaves).item() == reference.forward(cfg, tensors).item()


@pytest.mark.parametrize("fmt", ["py", "ipynb"])
def test_the_exported_file_carries_the_references_own_source(fmt):
    """Every reference function the file needs, as inspect.getsource gives it: if reference.py
    changes, the file changes with it; a forward typed again would not contain it."""
    cfg = RunRequest(**{**SMALL, "norm": "batchnorm"})
    text, _ = export.export(cfg, fmt)
    if fmt == "ipynb":
        text = "\n".join("".join(c["source"]) for c in json.loads(text)["cells"])
    needed = {reference.forward, reference.forward_from, reference.loss_of, reference.normalize}
    assert needed <= set(REFERENCE_FUNCTIONS)
    for function in REFERENCE_FUNCTIONS:
        assert inspect.getsource(function) in text + "\n", function.__name__
    assert f"NORM_EPS = {reference.NORM_EPS!r}" in text
    assert "F.layer_norm(" not in text.replace(inspect.getsource(reference.normalize), "")


def test_the_manual_side_never_imports_the_reference():
    """A mistake in an op must not be able to hide the same mistake in its check."""
    manual = [ROOT / "app/engine/network.py", *sorted((ROOT / "app/ops").glob("*.py"))]
    for path in manual:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith("app.check") for n in names), (path, names)
