"""POST /api/export: every exported script runs in a fresh Python process, prints the API's loss
and exits 0 exactly when every gradient matches; every notebook validates and its cells
reproduce the same loss and gradients."""

from __future__ import annotations

import io
import math
import random
import re
from contextlib import redirect_stdout

import nbformat
import pytest
import torch

from app.check import tolerance
from app.check.autograd import autograd_gradients
from app.engine.network import Network
from app.engine.tensors import make_tensors
from app.export import run as export
from app.export.lines import module_body
from app.ops import Context
from app.runs import pipeline
from app.schemas import RunRequest
from tests.scripts import run_script

# runs every exported script and notebook in a process of its own
pytestmark = pytest.mark.slow

SMALL = dict(batch=6, in_features=5, hidden=[4], out_features=1)
CONFIGS = {
    "article": {},  # the article's default, at full size
    "layernorm_ce": dict(
        batch=[3, 4], in_features=6, hidden=[5, 4], out_features=4, norm="layernorm",
        loss="cross_entropy", init="kaiming", seed=3,
    ),
    "list_batch": dict(
        batch=[2, 3, 2], in_features=4, hidden=[3], out_features=2, activation="tanh", seed=5
    ),
    "float64": dict(
        batch=8, in_features=5, hidden=[4, 3], out_features=3, dtype="float64",
        norm="batchnorm", activation="sigmoid", init="xavier", init_scale=0.5, seed=7,
    ),
    "leaky_batchnorm_ce": dict(
        batch=[4, 2], in_features=3, hidden=[6], out_features=5, activation="leaky_relu",
        norm="batchnorm", loss="cross_entropy", seed=11,
    ),
    "single_linear": dict(batch=5, in_features=4, hidden=[], out_features=1, seed=2),
    "mnist": dict(
        data="mnist", batch=64, hidden=[16], out_features=10, loss="cross_entropy",
        init="kaiming", seed=1,
    ),
    "digits_mse_list_batch": dict(data="digits", batch=[4, 8], hidden=[8], dtype="float64"),
    "formulas_right": dict(
        batch=[3, 4], in_features=5, hidden=[4], formulas={
            "l1.g": "torch.where(l1 > 0, a1.g, torch.zeros_like(a1.g))",
            "x.g": "l1.g @ w1.T",
            "w1.g": 'torch.einsum("abi,abo->io", x, l1.g)',
            "b1.g": "sys = l1.g * 1\nsys.sum((0, 1))",  # a local that would hide sys
        },
    ),
    "formulas_wrong": dict(  # the mask forgotten: l1.g and everything after it is wrong
        batch=6, in_features=5, hidden=[3], activation="tanh", formulas={"l1.g": "a1.g * 1"}
    ),
    "formula_wrong_leaf": dict(  # mean for sum: only b1.g is wrong
        batch=[3, 4], in_features=5, hidden=[4], formulas={"b1.g": "l1.g.mean((0, 1))"}
    ),
    # gradients that cancel to ~0: the API passes them by its rounding recheck, so must the file
    "cancelling_layernorm": dict(batch=4, in_features=3, hidden=[1], norm="layernorm"),
    "cancelling_batchnorm": dict(batch=2, in_features=3, hidden=[4], norm="batchnorm"),
}  # fmt: skip
WRONG = {"formulas_wrong": ["x", "w1", "b1", "l1"], "formula_wrong_leaf": ["b1"]}
LOSS_LINE = re.compile(r"^loss (\S+)$", re.M)


def _export(client, config: dict, fmt: str):
    response = client.post("/api/export", json={"config": config, "format": fmt})
    assert response.status_code == 200, response.text
    return response


@pytest.fixture(scope="module")
def runs(client):
    """Each config's API response (its loss and check)."""
    out = {}
    for name, config in CONFIGS.items():
        response = client.post("/api/run", json=config)
        assert response.status_code == 200, response.text
        out[name] = response.json()
    return out


@pytest.fixture(scope="module")
def scripts(client, tmp_path_factory):
    """Each config's script, run as `python <name>.py` in its folder (tests/scripts.py)."""
    folder = tmp_path_factory.mktemp("scripts")
    done = {}
    for name, config in CONFIGS.items():
        response = _export(client, config, "py")
        path = folder / f"{name}.py"
        path.write_text(response.text)
        done[name] = run_script([path.name], cwd=folder, timeout=300)
    return done


@pytest.mark.parametrize("name", CONFIGS)
def test_script_prints_the_api_loss_and_check(name, runs, scripts):
    """The same loss; the same verdict per gradient as the API's check; exit 0 exactly when
    every gradient matches, else 1 naming the ones that differ."""
    result = scripts[name]
    check = runs[name]["check"]
    wrong = WRONG.get(name, [])
    assert check["all_close"] is (not wrong)
    assert result.returncode == (1 if wrong else 0), result.stdout + result.stderr
    losses = LOSS_LINE.findall(result.stdout)
    assert len(losses) == 1, result.stdout
    assert float(losses[0]) == pytest.approx(runs[name]["loss"], rel=1e-6)
    # one table line per gradient the API checks, with its max abs error and allclose
    for grad, verdict in {**check["tensors"], **check["intermediates"]}.items():
        line = re.search(
            rf"^{re.escape(grad)}\s+\(.*?\)\s+(\S+)\s+(\S+)\s+(True|False)\b", result.stdout, re.M
        )
        assert line, f"no check line for {grad}:\n{result.stdout}"
        assert line.group(3) == str(verdict["allclose"]), grad
        if not verdict["allclose"]:  # the formula's error, far above any rounding
            assert float(line.group(1)) == pytest.approx(verdict["max_abs_err"], rel=1e-2)
    assert sorted(g for g, v in check["tensors"].items() if not v["allclose"]) == sorted(
        g for g in wrong if g in check["tensors"]
    )
    if wrong:
        assert f"differ from autograd: {', '.join(wrong)}" in result.stdout
    else:
        assert "every gradient matches autograd" in result.stdout


@pytest.mark.parametrize("name", CONFIGS)
def test_notebook_validates_and_reproduces_loss_and_gradients(name, client, runs):
    response = _export(client, CONFIGS[name], "ipynb")
    nb = nbformat.reads(response.text, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    # a markdown cell before each layer's backward, with the broadcast shapes
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown" and cell.source.startswith("## Backward"):
            assert nb.cells[i + 1].cell_type == "code"
            assert re.search(r"\(\d+(, \d+)*,?\)", cell.source), cell.source
    namespace: dict = {"__name__": "__main__"}
    *cells, check_cell = code
    for cell in cells:
        exec(compile(cell.source, f"<{name} cell>", "exec"), namespace)  # our own generated code
    assert namespace["loss"].item() == pytest.approx(runs[name]["loss"], rel=1e-6)
    if name in WRONG:
        message = f"differ from autograd: {', '.join(WRONG[name])}"
        with pytest.raises(AssertionError, match=message):
            exec(compile(check_cell.source, f"<{name} check>", "exec"), namespace)
    else:
        exec(compile(check_cell.source, f"<{name} check>", "exec"), namespace)

    # the same tensors and gradients as the API's: manual (the run's formulas, by any
    # strategy) and autograd (bit for bit: the same functional ops)
    cfg = RunRequest(**CONFIGS[name])
    tensors = make_tensors(cfg)
    net = Network.from_config(cfg)
    formulas = pipeline.learner_formulas(cfg, net)
    manual = net.backward(net.forward(tensors), Context(strategy="matmul"), formulas)
    reference = autograd_gradients(cfg, tensors)
    for grad, value in reference.items():
        assert torch.equal(namespace[grad], tensors[grad])
        assert torch.equal(namespace["leaves"][grad].grad, value), grad
        torch.testing.assert_close(namespace[grad].g, manual[grad], rtol=1e-4, atol=1e-5)


def test_export_headers_and_default(client):
    response = client.post("/api/export", json={})
    assert response.status_code == 200
    disposition = response.headers["content-disposition"]
    assert disposition == 'attachment; filename="broadprop_784-50-1_relu_mse_float32_seed0.py"'
    assert response.headers["content-type"].startswith("text/x-python")
    response = _export(client, {"hidden": [8], "batch": 4}, "ipynb")
    assert response.headers["content-type"] == "application/x-ipynb+json"
    assert re.fullmatch(
        r'attachment; filename="broadprop_784-8-1_relu_mse_float32_seed0\.ipynb"',
        response.headers["content-disposition"],
    )


@pytest.mark.parametrize(
    "body, loc",
    [
        ({"format": "pdf"}, ["body", "format"]),
        ({"config": {"batch": 0}, "format": "py"}, ["body", "config", "batch"]),
        ({"config": {"activation": "gelu"}}, ["body", "config", "activation"]),
        ({"config": {"colour": "red"}}, ["body", "config", "colour"]),
        ({"config": {}, "extra": 1}, ["body", "extra"]),
        ({"config": [1, 2]}, ["body", "config"]),
        # what POST /api/run refuses, located under config
        ({"config": {"formulas": {"x.g": "l1.g.sum("}}}, ["body", "config", "formulas", "x.g"]),
        ({"config": {"formulas": {"x.g": "l1.g * w1"}}}, ["body", "config", "formulas", "x.g"]),
        ({"config": {"formulas": {"q.g": "l1.g"}}}, ["body", "config", "formulas", "q.g"]),
        ({"config": {"batch": 20000, "hidden": [4096]}}, ["body", "config", "batch"]),
    ],
)
def test_bad_config_or_format_is_422(client, body, loc):
    response = client.post("/api/export", json=body)
    assert response.status_code == 422
    assert any(d["loc"] == loc for d in response.json()["detail"]), response.json()


def test_the_formulas_are_the_traces(client):
    """Every forward and backward statement of the file is a statement of the trace's code."""
    cfg = RunRequest(**CONFIGS["layernorm_ce"])
    text = _export(client, CONFIGS["layernorm_ce"], "py").text
    code = {line.split("  # ")[0] for line in text.splitlines()}
    forward, backward = pipeline.trace(cfg)
    for entry in [*forward, *backward]:
        last = entry["code"].splitlines()[-1]
        if entry.get("variant"):
            last = last.replace(f"{entry['grad']}.g = ", f"{entry['grad']}_g_{entry['variant']} = ")
        assert last in code, last
    # the article's slips: out.g stored, abs() in the check, b1 compared
    assert re.search(r"^out\.g = ", text, re.M)
    assert "\n".join(module_body(tolerance)) in text  # the check is app/check/tolerance.py
    assert '"b1": b1.g,' in text


@pytest.mark.parametrize("name", CONFIGS)
def test_each_statement_owns_its_steps(name):
    """The shape comment of a statement comes from its own trace steps: each step's
    expression is (part of) that statement's expression."""
    cfg = RunRequest(**CONFIGS[name])
    forward, backward = pipeline.trace(cfg)
    for entry in [*forward, *backward]:
        stmts = export.statements(entry["code"], entry["steps"], entry["shape"])
        assert sum(len(s.steps) for s in stmts) == len(entry["steps"])
        for stmt in stmts:
            for step in stmt.steps:
                assert step["expr"] in stmt.expr, (step["expr"], stmt.line)


def test_shape_comment_reads_like_the_article():
    cfg = RunRequest()
    _, backward = pipeline.trace(cfg)
    x_g = next(e for e in backward if e["grad"] == "x")
    (stmt,) = export.statements(x_g["code"], x_g["steps"], x_g["shape"])
    assert stmt.commented() == (
        "x.g = (l1.g.unsqueeze(1) * w1).sum(-1)"
        "  # (1000, 1, 50) * (784, 50) -> (1000, 784, 50) -> sum(-1) -> (1000, 784)"
    )


@pytest.mark.parametrize("name", CONFIGS)
def test_tensor_statements_make_the_runs_tensors_bit_for_bit(name):
    cfg = RunRequest(**CONFIGS[name])
    namespace: dict = {}
    exec(
        "\n".join([*export.data_imports(cfg), "import torch", *export.tensor_statements(cfg)]),
        namespace,
    )
    for tensor_name, tensor in make_tensors(cfg).items():
        assert namespace[tensor_name].dtype == tensor.dtype
        assert torch.equal(namespace[tensor_name], tensor), tensor_name


@pytest.mark.parametrize("init", ["randn", "kaiming", "xavier"])
@pytest.mark.parametrize("init_scale", [1.0, 0.3, -2.0])
def test_tensor_statements_every_init(init, init_scale):
    cfg = RunRequest(batch=[2, 2], in_features=3, hidden=[4], out_features=2, init=init,
                     init_scale=init_scale, norm="layernorm", dtype="float64")  # fmt: skip
    namespace: dict = {}
    exec(
        "\n".join([*export.data_imports(cfg), "import torch", *export.tensor_statements(cfg)]),
        namespace,
    )
    for tensor_name, tensor in make_tensors(cfg).items():
        assert torch.equal(namespace[tensor_name], tensor), tensor_name


@pytest.mark.parametrize(
    "old, new, differ",
    [
        # b1 is compared (the article never did)
        ("b1.g = l1.g.sum(0)", "b1.g = l1.g.sum(0) * 1.01", "b1"),
        # abs(): a manual gradient smaller than autograd's fails too (is_same without abs
        # would have passed it)
        (
            "x.g = (l1.g.unsqueeze(1) * w1).sum(-1)",
            "x.g = (l1.g.unsqueeze(1) * w1).sum(-1) - 1",
            "x",
        ),
        # a wrong upstream gradient fails itself and everything downstream
        ("l1.g = (l1 > 0).float() * a1.g", "l1.g = a1.g", "x, w1, b1, l1"),
    ],
)
def test_a_wrong_formula_exits_1_naming_what_differs(client, old, new, differ):
    text = _export(client, SMALL, "py").text
    assert old in text
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        exec(compile(text.replace(old, new), "<tampered>", "exec"), {"__name__": "__main__"})
    assert exit_.value.code == 1
    assert f"differ from autograd: {differ}" in out.getvalue()


def _run_in_process(text: str) -> tuple[int, str]:
    out = io.StringIO()
    code = 0
    with redirect_stdout(out):
        try:
            exec(compile(text, "<export>", "exec"), {"__name__": "__main__"})
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue()


def _random_config(rng: random.Random) -> dict:
    loss = rng.choice(["mse", "cross_entropy"])
    batch = rng.choice([rng.randint(1, 6), [rng.randint(1, 3), rng.randint(1, 3)]])
    norm = rng.choice(["none", "layernorm", "batchnorm"])
    if norm == "batchnorm" and math.prod([batch] if isinstance(batch, int) else batch) < 2:
        batch = 2
    return dict(
        batch=batch,
        in_features=rng.randint(1, 5),
        hidden=[rng.randint(1, 4) for _ in range(rng.randint(0, 2))],
        out_features=rng.randint(2, 4) if loss == "cross_entropy" else rng.randint(1, 3),
        activation=rng.choice(["relu", "leaky_relu", "tanh", "sigmoid"]),
        norm=norm,
        loss=loss,
        init=rng.choice(["randn", "kaiming", "xavier"]),
        init_scale=rng.choice([1.0, 0.5, 3.0]),
        dtype=rng.choice(["float32", "float64"]),
        seed=rng.randint(0, 1000),
    )


@pytest.mark.parametrize("seed", range(24))
def test_the_files_verdict_is_the_apis(client, seed):
    """Random small architectures (degenerate norms included): every gradient's allclose in
    the file's table is the API's, and the exit status follows."""
    config = _random_config(random.Random(seed))
    response = client.post("/api/run", json=config)
    assert response.status_code == 200, response.text
    check = response.json()["check"]
    code, out = _run_in_process(_export(client, config, "py").text)
    verdicts = {**check["tensors"], **check["intermediates"]}
    for grad, verdict in verdicts.items():
        line = re.search(rf"^{re.escape(grad)}\s+\(.*?\)\s+\S+\s+\S+\s+(True|False)\b", out, re.M)
        assert line and line.group(1) == str(verdict["allclose"]), (grad, config, out)
    assert code == (0 if check["all_close"] else 1), (config, out)


def test_an_exercise_hides_the_builtin_formulas(client):
    """`hide`: the file shows the learner's formula for a hidden gradient, never Broadprop's
    (neither as a comment nor as cross-entropy's fused variant), and still checks itself."""
    config = dict(
        batch=6, in_features=4, hidden=[3], out_features=3, loss="cross_entropy",
        formulas={"out.g": "probs = out.softmax(-1)\n(probs - F.one_hot(target, 3).float()) / 6",
                  "x.g": "l1.g @ w1.T"},
    )  # fmt: skip
    response = client.post("/api/export", json={"config": config, "hide": ["out.g", "x.g"]})
    assert response.status_code == 200, response.text
    text = response.text
    assert "out_g_fused" not in text and "fused" not in text
    assert "in place of Broadprop's" not in text
    assert "(l1.g.unsqueeze(1) * w1).sum(-1)" not in text
    assert "x.g = l1.g @ w1.T" in text
    code, out = _run_in_process(text)
    assert code == 0, out
    # without hide, the same run shows Broadprop's own formulas beside the learner's
    shown = _export(client, config, "py").text
    assert "out_g_fused" in shown and "in place of Broadprop's `x.g = " in shown


def test_hiding_a_gradient_the_learner_has_not_written_is_422(client):
    response = client.post("/api/export", json={"config": {}, "hide": ["x.g"]})
    assert response.status_code == 422
    (detail,) = response.json()["detail"]
    assert detail["loc"] == ["body", "hide"]
    assert "x.g" in detail["msg"] and "config.formulas" in detail["msg"]
