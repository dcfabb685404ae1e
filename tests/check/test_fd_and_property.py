"""A property test over random small architectures (manual vs autograd, end to end through
POST /api/run), and the float64 finite-difference check."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.check.fd import FD_MAX_FLOPS, fd_cost_flops, finite_difference_check
from app.engine.network import Network
from app.engine.tensors import make_tensors
from app.ops import Context
from app.schemas import RunRequest

CONFIGS = st.fixed_dictionaries(
    {
        "batch": st.one_of(st.integers(2, 6), st.lists(st.integers(1, 3), min_size=1, max_size=3)),
        "in_features": st.integers(1, 5),
        "hidden": st.lists(st.integers(1, 5), max_size=3),
        "out_features": st.integers(1, 4),
        "activation": st.sampled_from(["relu", "leaky_relu", "tanh", "sigmoid"]),
        "norm": st.sampled_from(["none", "layernorm", "batchnorm"]),
        "loss": st.sampled_from(["mse", "cross_entropy"]),
        "init": st.sampled_from(["randn", "kaiming", "xavier"]),
        "strategy": st.sampled_from(["broadcast", "einsum", "matmul"]),
        "dtype": st.sampled_from(["float32", "float64"]),
        "seed": st.integers(0, 2**31),
    }
)


def _valid(fields: dict) -> bool:
    """What the schema accepts: a batchnorm needs 2 or more batch positions. Degenerate norms
    (1-2 features, 2-3 rows), whose upstream gradients cancel to rounding noise, are in:
    the check's rounding recheck must judge them right."""
    lead = [fields["batch"]] if isinstance(fields["batch"], int) else fields["batch"]
    return not (fields["norm"] == "batchnorm" and fields["hidden"] and math.prod(lead) < 2)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(CONFIGS.filter(_valid))
def test_random_architectures_match_autograd(client, fields):
    response = client.post("/api/run", json={**fields, "fd_samples": 4})
    assert response.status_code == 200, response.text
    body = response.json()
    check = body["check"]
    bad = {
        n: c for n, c in {**check["tensors"], **check["intermediates"]}.items() if not c["allclose"]
    }
    assert check["all_close"], bad
    expected = {"x", *(f"{p}{k}" for k in range(1, len(fields["hidden"]) + 2) for p in "wb")}
    if fields["norm"] != "none":
        expected |= {
            f"{p}{k}" for k in range(1, len(fields["hidden"]) + 1) for p in ("gamma", "beta")
        }
    assert set(check["tensors"]) == expected <= set(body["gradients"])
    fd = check["finite_difference"]
    assert set(fd) == expected
    for name, entry in fd.items():  # degenerate norms included: their noise is accounted for
        assert entry["allclose"], (name, entry, fields)


def _cfg(**fields):
    return RunRequest(**{"batch": 6, "in_features": 4, "hidden": [5], "out_features": 3, **fields})


@pytest.mark.parametrize(
    "fields",
    [
        dict(activation="relu", loss="cross_entropy", batch=[4, 3]),
        dict(activation="leaky_relu", norm="batchnorm", dtype="float64"),
        dict(activation="tanh", norm="layernorm", hidden=[5, 4]),
        dict(activation="sigmoid", loss="mse", out_features=1, batch=[2, 2, 2]),
    ],
)
def test_fd_reports_small_errors_on_a_correct_run(fields):
    cfg = _cfg(fd_samples=12, **fields)
    tensors = make_tensors(cfg)
    net = Network.from_config(cfg)
    grads = net.backward(net.forward(tensors), Context())
    report = finite_difference_check(cfg, tensors, grads)
    assert set(report) == {n for n in tensors if n != "target"}
    tol = 1e-4 if cfg.dtype == "float32" else 1e-7
    for name, entry in report.items():
        assert 1 <= entry["samples"] <= min(12, tensors[name].numel())
        assert entry["max_rel_err"] < tol, (name, entry)
    assert finite_difference_check(cfg, tensors, grads) == report  # deterministic from the seed


def test_fd_catches_a_wrong_gradient():
    cfg = _cfg(fd_samples=8, activation="tanh")
    tensors = make_tensors(cfg)
    net = Network.from_config(cfg)
    grads = net.backward(net.forward(tensors), Context())
    grads["w1"] = grads["w1"] * 1.01
    report = finite_difference_check(cfg, tensors, grads)
    assert report["w1"]["max_rel_err"] > 1e-3
    assert report["x"]["max_rel_err"] < 1e-4
    assert report["w1"]["allclose"] is False and report["x"]["allclose"] is True
    grads["b1"] = grads["b1"] * 0  # an all-zero gradient: the differences set the scale
    zero = finite_difference_check(cfg, tensors, grads)["b1"]
    assert zero["allclose"] is False and zero["max_rel_err"] == pytest.approx(1.0, rel=0.5)


def test_fd_skips_entries_next_to_a_relu_kink():
    """A pre-activation exactly at 0 that an entry moves is never sampled: with b1 set so
    that l1 == 0 in one column for every row, no sample of b1 lands on that column."""
    cfg = _cfg(fd_samples=5, activation="relu", hidden=[5], batch=3)
    tensors = make_tensors(cfg)
    tensors["w1"][:, 2] = 0.0
    tensors["b1"][2] = 0.0  # l1[:, 2] == 0: relu's kink, for every row
    net = Network.from_config(cfg)
    grads = net.backward(net.forward(tensors), Context())
    report = finite_difference_check(cfg, tensors, grads)
    assert report["b1"]["samples"] == 4  # 5 entries, the kinked one skipped
    assert report["b1"]["max_rel_err"] < 1e-4


def test_fd_cost_is_bounded_by_the_schema(client):
    assert fd_cost_flops(SimpleNamespace(**_cfg(fd_samples=0).model_dump())) == 0
    article = RunRequest(fd_samples=64)
    assert fd_cost_flops(article) < FD_MAX_FLOPS
    response = client.post("/api/run", json={"batch": 20000, "fd_samples": 64})
    assert response.status_code == 422
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", "fd_samples"]
    assert "reduce fd_samples" in detail["msg"]


def test_batchnorm_needs_two_positions(client):
    response = client.post("/api/run", json={"batch": 1, "hidden": [3], "norm": "batchnorm"})
    assert response.status_code == 422
    assert "batchnorm" in response.json()["detail"][0]["msg"]
    assert (
        client.post(
            "/api/run", json={"batch": [1, 2], "in_features": 3, "hidden": [3], "norm": "batchnorm"}
        ).status_code
        == 200
    )


def test_fd_in_the_run_response(client):
    response = client.post(
        "/api/run",
        json={
            "batch": [4, 3],
            "in_features": 5,
            "hidden": [4],
            "out_features": 3,
            "loss": "cross_entropy",
            "norm": "layernorm",
            "fd_samples": 6,
        },
    )
    assert response.status_code == 200
    fd = response.json()["check"]["finite_difference"]
    assert set(fd) == {"x", "w1", "b1", "gamma1", "beta1", "w2", "b2"}
    assert all(v["samples"] >= 1 and v["max_rel_err"] < 1e-4 for v in fd.values())
    assert "finite_difference" not in client.post(
        "/api/run", json={"batch": 4, "in_features": 3}
    ).json()["check"] or (
        client.post("/api/run", json={"batch": 4, "in_features": 3}).json()["check"][
            "finite_difference"
        ]
        is None
    )
