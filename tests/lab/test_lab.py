"""The formula lab end to end: the learner's formulas through POST /api/run.

Correct alternatives pass; wrong values fail exactly the gradients they should (their own and
everything computed after them); shape errors and wrong result shapes are refused with
messages that name the shapes; the trace marks the learner's formula."""

from __future__ import annotations

import pytest
import torch

from app.check.autograd import autograd_gradients
from app.engine.network import Network
from app.engine.tensors import make_tensors
from app.lab.allowlist import FormulaError
from app.lab.evaluation import evaluate
from app.lab.parse import parse
from app.ops import Context
from app.ops.traced import Traced
from app.runs.pipeline import learner_formulas
from app.schemas import RunRequest

SMALL = {"batch": 6, "in_features": 5, "hidden": [4], "seed": 3}
# downstream of each gradient of the small net: computed after it in the backward pass
AFTER = {
    "out": ["w2", "b2", "x", "w1", "b1"],
    "a1": ["x", "w1", "b1"],
    "l1": ["x", "w1", "b1"],
    "x": [],
    "w1": [],
    "b1": [],
    "w2": [],
    "b2": [],
}


def run(client, formulas, **config):
    return client.post("/api/run", json={**SMALL, **config, "formulas": formulas})


def failing(body) -> set[str]:
    check = body["check"]
    return {n for section in ("tensors", "intermediates") for n, c in check[section].items()
            if not c["allclose"]}  # fmt: skip


# --------------------------------------------------------------------------- correct ones

CORRECT = {
    "the article's x.g": {"x.g": "(l1.g.unsqueeze(1) * w1).sum(-1)"},
    "the article's w1.g": {"w1.g": "(x.unsqueeze(-1) * l1.g.unsqueeze(1)).sum(0)"},
    "the article's b1.g": {"b1.g": "l1.g.sum(0)"},
    "the article's relu": {"l1.g": "(l1 > 0).float() * a1.g"},
    "the article's mse": {"out.g": "2 * (out.squeeze(-1) - target).unsqueeze(-1) / out.shape[0]"},
    "matrix forms": {"x.g": "l1.g @ w1.T", "w1.g": "x.T @ l1.g", "w2.g": "a1.t() @ out.g"},
    "einsum forms": {
        "x.g": "torch.einsum('bo,io->bi', l1.g, w1)",
        "w1.g": "torch.einsum('bi,bo->io', x, l1.g)",
    },
    "torch.where": {"l1.g": "torch.where(l1 > 0, a1.g, 0.0)"},
    "locals over lines": {
        "x.g": "g = l1.g.unsqueeze(1)  # (B, 1, out)\nprod = g * w1\nx.g = prod.sum(dim=-1)",
        "a1.g": "w = w2.transpose(0, 1)\nout.g @ w",
    },
    "every gradient at once": {
        "out.g": "2 * (out.squeeze(-1) - target).unsqueeze(-1) / out.shape[0]",
        "w2.g": "(a1.unsqueeze(-1) * out.g.unsqueeze(1)).sum(0)",
        "b2.g": "out.g.sum(0)",
        "a1.g": "(out.g.unsqueeze(1) * w2).sum(-1)",
        "l1.g": "(l1 > 0).float() * a1.g",
        "x.g": "(l1.g.unsqueeze(1) * w1).sum(-1)",
        "w1.g": "(x.unsqueeze(-1) * l1.g.unsqueeze(1)).sum(0)",
        "b1.g": "l1.g.sum(0)",
    },
}


@pytest.mark.parametrize("formulas", CORRECT.values(), ids=CORRECT.keys())
def test_correct_formulas_match_autograd(client, formulas):
    response = run(client, formulas)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["check"]["all_close"], failing(body)
    users = {f"{e['grad']}.g" for e in body["backward"] if e["source"] == "user"}
    assert users == set(formulas)
    assert set(body["formulas"]) == set(formulas)
    assert body["config"]["formulas"] == formulas


def test_the_learner_formula_is_traced_like_a_builtin(client):
    body = run(client, {"x.g": "(l1.g.unsqueeze(1) * w1).sum(-1)"}).json()
    entry = next(e for e in body["backward"] if e["grad"] == "x")
    assert entry["source"] == "user"
    assert entry["reference_code"] == "x.g = (l1.g.unsqueeze(1) * w1).sum(-1)"
    assert [s["action"] for s in entry["steps"]] == ["unsqueeze", "broadcast", "reduce"]
    product = entry["steps"][1]
    assert product["inputs"] == [[6, 1, 4], [5, 4]] and product["output"] == [6, 5, 4]
    assert product["bytes"] == 6 * 5 * 4 * 4
    assert product["broadcast"]["a"]["expanded"] == [1]
    assert body["formulas"]["x.g"]["steps"] == entry["steps"]
    assert body["formulas"]["x.g"]["bytes"] == sum(
        s["bytes"] for s in entry["steps"] if s["action"] != "unsqueeze"
    )
    others = [e for e in body["backward"] if e["grad"] != "x"]
    assert all(e["source"] == "reference" for e in others)


def test_locals_are_written_out_as_lines(client):
    body = run(client, {"x.g": "g = l1.g.unsqueeze(1)\n(g * w1).sum(-1)"}).json()
    assert body["formulas"]["x.g"]["code"] == "g = l1.g.unsqueeze(1)\nx.g = (g * w1).sum(-1)"


# --------------------------------------------------------------------------- wrong values


@pytest.mark.parametrize(
    "grad, formula",
    [
        ("out", "(out.squeeze(-1) - target).unsqueeze(-1) / out.shape[0]"),  # the 2 forgotten
        ("a1", "(out.g.unsqueeze(1) * w2).sum(-1) * 0.5"),
        ("l1", "a1.g"),  # relu without its mask
        ("x", "-(l1.g.unsqueeze(1) * w1).sum(-1)"),
        ("w1", "(x.unsqueeze(-1) * l1.g.unsqueeze(1)).mean(0)"),
        ("b1", "l1.g.sum(0) + 0.1"),
        ("w2", "(a1.unsqueeze(-1) * out.g.unsqueeze(1)).sum(0).abs()"),
    ],
)
def test_a_wrong_value_fails_its_gradient_and_what_comes_after(client, grad, formula):
    response = run(client, {f"{grad}.g": formula})
    assert response.status_code == 200, response.text
    body = response.json()
    assert not body["check"]["all_close"]
    bad = failing(body)
    assert grad in bad
    # everything computed before it is untouched; what is computed from it is wrong (a
    # gradient that only reads the wrong one through a relu mask may stay right by luck, so
    # the propagation is asserted where the chain is linear: x.g and w1.g from l1.g)
    order = ["out", "a1", "w2", "b2", "l1", "x", "w1", "b1"]
    before = order[: order.index(grad)]
    assert not bad & set(before), bad
    if grad in ("out", "a1", "l1"):
        assert {"x", "w1", "b1"} <= bad


def test_propagation_uses_the_learners_values(client):
    """x.g computed after a wrong l1.g is the built-in formula applied to the wrong l1.g."""
    cfg = RunRequest(**SMALL, formulas={"l1.g": "a1.g * 3"})
    net = Network.from_config(cfg)
    tensors = make_tensors(cfg)
    env = net.forward(tensors)
    grads = net.backward(env, Context(), learner_formulas(cfg, net))
    reference = net.backward(env, Context())
    assert torch.equal(grads["l1"], reference["a1"] * 3)
    assert torch.allclose(grads["x"], grads["l1"] @ tensors["w1"].T, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(grads["x"], reference["x"], rtol=1e-3, atol=1e-4)
    truth = autograd_gradients(cfg, tensors)
    assert torch.allclose(reference["x"], truth["x"], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- shape errors


def error(response):
    assert response.status_code == 422, response.text
    (detail,) = response.json()["detail"]
    return detail


def test_a_broadcast_clash_quotes_the_expression_and_both_shapes(client):
    detail = error(run(client, {"x.g": "(l1.g * w1).sum(-1)"}))
    assert detail["loc"] == ["body", "formulas", "x.g"]
    msg = detail["msg"]
    assert msg.startswith("`l1.g * w1`: (6, 4) and (5, 4)")
    assert "dim -2 (6 vs 5)" in msg
    assert "`l1.g.unsqueeze(1)`" in msg  # the catalogue's hint
    table = msg.splitlines()[1:]
    assert table == ["  l1.g  [ 6  4 ]", "  w1    [ 5  4 ]"]
    ctx = detail["ctx"]
    assert ctx["kind"] == "shape" and ctx["dim"] == -2 and ctx["sizes"] == [6, 5]
    assert ctx["operands"] == [{"expr": "l1.g", "shape": [6, 4]}, {"expr": "w1", "shape": [5, 4]}]


def test_right_alignment_pads_the_shorter_shape(client):
    detail = error(run(client, {"x.g": "(l1.g.unsqueeze(1) * w1.T).sum(-1)"}))
    lines = detail["msg"].splitlines()[1:]
    assert lines == ["  l1.g.unsqueeze(1)  [ 6  1  4 ]", "  w1.T               [    4  5 ]"]
    assert "w1.T.T" not in detail["msg"]


def test_matmul_clash_suggests_the_transpose(client):
    detail = error(run(client, {"x.g": "l1.g @ w1"}))
    assert "(6, 4) @ (5, 4)" in detail["msg"] and "`l1.g @ w1.T`" in detail["msg"]


@pytest.mark.parametrize(
    "grad, formula, made, hint",
    [
        ("x", "l1.g.unsqueeze(1) * w1", "(6, 5, 4)", "`.sum(-1)`"),
        ("b1", "l1.g", "(6, 4)", "`.sum(0)`"),
        ("b1", "l1.g.sum(0, keepdim=True)", "(1, 4)", "squeeze(0)"),
        ("w1", "l1.g.T @ x", "(4, 5)", "`.T`"),
        ("out", "2 * (out - target) / 6", "(6, 6)", "(N, N)"),
        ("out", "2 * (out.squeeze(-1) - target) / 6", "(6,)", ".unsqueeze(-1)"),
        ("x", "(l1.g.unsqueeze(1) * w1).sum()", "a scalar ()", ".sum() or .mean()"),
    ],
)
def test_a_wrong_result_shape_names_both_shapes(client, grad, formula, made, hint):
    detail = error(run(client, {f"{grad}.g": formula}))
    assert detail["loc"] == ["body", "formulas", f"{grad}.g"]
    assert detail["ctx"]["kind"] == "result_shape"
    assert made in detail["msg"] and hint in detail["msg"]


def test_unknown_key_lists_the_valid_ones(client):
    detail = error(run(client, {"foo.g": "x"}))
    assert detail["loc"] == ["body", "formulas", "foo.g"]
    assert "x.g, w1.g, b1.g" in detail["msg"]
    assert detail["ctx"]["valid"] == ["out.g", "a1.g", "w2.g", "b2.g", "l1.g", "x.g", "w1.g",
                                      "b1.g"]  # fmt: skip


@pytest.mark.parametrize(
    "formula, words",
    [
        ("x.g", "x.g is computed after l1.g"),
        ("l1.g", "the gradient this formula computes"),
        ("nope", "no tensor or local named nope"),
        ("w9.g", "no gradient w9.g"),
        ("x = 1\nx", "the run's own"),
        ("w1.g = a1.g", "this formula is for l1.g"),
    ],
)
def test_names_the_formula_cannot_use(client, formula, words):
    detail = error(run(client, {"l1.g": formula}))
    assert words in detail["msg"]


def test_a_formula_over_the_memory_budget_is_refused_before_it_runs(client):
    detail = error(
        client.post(
            "/api/run",
            json={
                "batch": 20000,
                "formulas": {"w1.g": "(x.unsqueeze(-1) * l1.g.unsqueeze(1)).sum(0)"},
            },
        )
    )
    assert detail["loc"] == ["body", "formulas", "w1.g"]
    assert (
        detail["ctx"]["kind"] == "budget"
        and detail["ctx"]["bytes"] == 20000 * 784 * 50 * 4 + 784 * 50 * 4
    )
    assert "GiB" in detail["msg"] and "einsum" in detail["msg"]


def test_a_stretched_view_counts_its_full_work(client):
    """expand allocates nothing, but summing it reads every stretched element."""
    detail = error(run(client, {"b1.g": "l1.g.expand(10**9, 6, 4).sum((0, 1)) / 10**9"},
                       batch=6))  # fmt: skip
    assert detail["ctx"]["kind"] == "work"
    assert "work limit" in detail["msg"]


def test_formulas_work_through_every_architecture(client):
    """layernorm, cross-entropy and list batches: the built-in code, typed back in, passes."""
    config = {"batch": [2, 3], "in_features": 4, "hidden": [5], "norm": "layernorm",
              "loss": "cross_entropy", "out_features": 3}  # fmt: skip
    reference = client.post("/api/run", json=config).json()
    codes = {f"{e['grad']}.g": e["code"] for e in reference["backward"] if "variant" not in e}
    response = client.post("/api/run", json={**config, "formulas": codes})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["check"]["all_close"], failing(body)
    assert all(e["source"] == "user" for e in body["backward"] if "variant" not in e)


# --------------------------------------------------------------------------- the evaluator


def meta(*shape):
    return torch.empty(shape, device="meta")


def test_evaluator_on_meta_tensors_allocates_nothing_and_gives_the_trace():
    tensors = {"x": Traced.leaf(meta(1000, 784), "x"), "w1": Traced.leaf(meta(784, 50), "w1")}
    grads = {"l1": Traced.leaf(meta(1000, 50), "l1.g")}
    result = evaluate(parse("x.g", "(l1.g.unsqueeze(1) * w1).sum(-1)"), tensors, grads)
    assert result.t.is_meta and result.shape == (1000, 784)
    assert [s.output for s in result.steps] == [(1000, 1, 50), (1000, 784, 50), (1000, 784)]
    assert result.steps[1].bytes == 1000 * 784 * 50 * 4


@pytest.mark.parametrize(
    "source",
    ["x.shape[0]", "2 ** 3", "x.numel()", "x.dim()"],
)
def test_a_number_is_not_a_gradient(source):
    tensors = {"x": Traced.leaf(meta(3, 2), "x")}
    with pytest.raises(FormulaError, match="not a tensor"):
        evaluate(parse("x.g", source), tensors, {})
