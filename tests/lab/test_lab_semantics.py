"""The formula lab means what PyTorch means, or refuses (contract: "The check's verdict and
the formula language's semantics"), and its refusals lead somewhere."""

from __future__ import annotations

import pytest

CE = {"batch": 6, "in_features": 4, "hidden": [3], "out_features": 5, "loss": "cross_entropy"}


def _run(client, source: str, key: str = "out.g", config: dict | None = None):
    return client.post("/api/run", json={**(config or CE), "formulas": {key: source}})


@pytest.mark.parametrize(
    "source",
    [
        # fast.ai's logsumexp: x.max(-1)[0] is the values, as in PyTorch
        "m = out.max(-1)[0]\ne = (out - m.unsqueeze(-1)).exp()\n"
        "(e / e.sum(-1, keepdim=True) - F.one_hot(target, num_classes=5)) / 6",
        "m = out.max(-1, keepdim=True).values\ne = (out - m).exp()\n"
        "(e / e.sum(-1, keepdims=True) - F.one_hot(target, 5)) / 6",
        "(F.softmax(out, 1) - F.one_hot(target, num_classes=out.shape[1])) / out.shape[0]",
    ],
    ids=["max-index-0", "max-values-keepdims", "F.softmax"],
)
def test_max_with_a_dim_is_values_and_indices(client, source):
    r = _run(client, source)
    assert r.status_code == 200, r.text[:400]
    assert r.json()["check"]["all_close"], r.json()["check"]


def test_the_indices_of_max_are_the_argmax(client):
    source = "i = out.max(-1).indices\n(out.softmax(-1) - F.one_hot(target, 5)) / 6 + 0 * F.one_hot(i, 5)"
    r = _run(client, source)
    assert r.status_code == 200, r.text[:400]
    assert r.json()["check"]["all_close"], r.json()["check"]


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("out.max(-1) * 2", ["(values, indices)", ".values"]),
        ("out.amax(-1).values", ["pair"]),
        ("F.one_hot(target)", ["num_classes"]),
        ("torch.arangee(5)", ["torch.arange", "torch.einsum"]),
        ("a = 1\nb += 2\nc[0] = 1\nout", ["b += 2", "x = x + ...", "/api/program"]),
        ("c[0] = 1\nout", ["indexed assignment", "F.one_hot"]),
        ("out.sum(0, keepdims=True, keepdim=True)", ["twice"]),
        ("out.var(0, unbiased=True, correction=0)", ["not both"]),
    ],
)
def test_refusals_say_what_to_write(client, source, words):
    r = _run(client, source)
    assert r.status_code == 422, r.text[:400]
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", "formulas", "out.g"]
    for word in words:
        assert word in detail["msg"], (word, detail["msg"])
    assert "<lambda>" not in detail["msg"]


def test_with_several_bad_lines_the_first_is_named(client):
    r = _run(client, "a = x.__class__\nb = import_me\nc = out.__dict__\nout")
    msg = r.json()["detail"][0]["msg"]
    assert msg.startswith("`x.__class__`"), msg


def test_var_and_std_mean_what_torch_means(client):
    import torch

    x = torch.randn(6, 3, dtype=torch.float64)
    for source, expected in [
        ("x.var(0)", x.var(0)),
        ("x.var(0, unbiased=False)", x.var(0, unbiased=False)),
        ("x.std(0, correction=0)", x.std(0, correction=0)),
    ]:
        from app.lab.evaluation import evaluate
        from app.lab.parse import parse
        from app.ops.traced import Traced

        got = evaluate(parse("x.g", source), {"x": Traced(x, "x")}, {})
        assert torch.allclose(got.t, expected), source


def test_a_wrong_max_index_would_fail_the_check(client):
    """The passing tests above could fail: taking the max row's values wrongly breaks it."""
    source = (
        "m = out.max(-1)[1].float()\ne = (out - m.unsqueeze(-1)).exp()\n"
        "(e / e.sum(-1, keepdim=True) - F.one_hot(target, num_classes=5)) / 6 + m.unsqueeze(-1)"
    )
    r = _run(client, source)
    assert r.status_code == 200, r.text[:400]
    assert r.json()["check"]["all_close"] is False
