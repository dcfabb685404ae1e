"""POST /api/run and friends through TestClient: status first, then fields, then error text."""

from __future__ import annotations

import json
import math

import pytest
import torch

from app.cost.admission import admit
from app.engine.memory import PeakMemory
from app.refusal import Refused as RequestValidationError
from app.schemas import RunRequest
from app.settings import Settings
from tests.conftest import article_reference


@pytest.fixture(scope="module")
def article(client):
    response = client.post("/api/run", json={})
    assert response.status_code == 200
    return response.json()


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_article_run_matches_the_articles_script(article):
    loss, grads = article_reference()
    assert article["loss"] == pytest.approx(loss, rel=1e-6)
    assert article["check"]["all_close"] is True
    for name, grad in grads.items():
        view = article["gradients"][name]
        assert view["shape"] == list(grad.shape)
        stats = view["stats"]
        assert stats["min"] == pytest.approx(grad.min().item(), rel=1e-4, abs=1e-3)
        assert stats["max"] == pytest.approx(grad.max().item(), rel=1e-4, abs=1e-3)
        assert stats["norm"] == pytest.approx(torch.linalg.vector_norm(grad).item(), rel=1e-4)


def test_article_config_has_every_default_filled_in(article):
    assert article["config"] == {
        "batch": 1000, "in_features": 784, "hidden": [50], "out_features": 1,
        "activation": "relu", "norm": "none", "loss": "mse", "init": "randn",
        "init_scale": 1.0, "seed": 0, "dtype": "float32", "strategy": "broadcast",
        "max_cells": 4096, "fd_samples": 0, "reference_heatmaps": False, "compare": False,
        "data": "random",
    }  # fmt: skip


def test_article_trace_has_the_articles_shapes(article):
    step_shapes = {tuple(s["output"]) for e in article["backward"] for s in e["steps"]}
    for shape in [(1000, 1, 50), (1000, 784, 50), (1000, 784), (1000, 784, 1), (784, 50), (50,)]:
        assert shape in step_shapes, shape
    codes = {e["grad"]: e["code"] for e in article["backward"]}
    assert codes["x"] == "x.g = (l1.g.unsqueeze(1) * w1).sum(-1)"
    assert codes["w1"] == "w1.g = (x.unsqueeze(-1) * l1.g.unsqueeze(1)).sum(0)"
    assert codes["b1"] == "b1.g = l1.g.sum(0)"
    assert codes["l1"] == "l1.g = (l1 > 0).float() * a1.g"
    assert codes["out"] == "out.g = 2 * (out.squeeze(-1) - target).unsqueeze(-1) / 1000"


def test_article_broadcast_step_reports_its_memory(article):
    x_entry = next(e for e in article["backward"] if e["grad"] == "x")
    product = next(s for s in x_entry["steps"] if s["action"] == "broadcast")
    assert product["inputs"] == [[1000, 1, 50], [784, 50]]
    assert product["output"] == [1000, 784, 50]
    assert product["bytes"] == 1000 * 784 * 50 * 4  # 156.8 MB if materialized
    assert product["broadcast"]["b"]["grad_sum_dims"] == [0]


def test_backward_is_in_execution_order(article):
    order = [e["grad"] for e in article["backward"]]
    assert order == ["out", "a1", "w2", "b2", "l1", "x", "w1", "b1"]
    assert [e["output"] for e in article["forward"]] == ["l1", "a1", "out", "loss"]


def test_tensors_have_shapes_roles_and_bytes(article):
    tensors = article["tensors"]
    assert tensors["x"] == {"shape": [1000, 784], "role": "input", "bytes": 3136000}
    assert tensors["target"]["role"] == "target"
    assert tensors["w1"]["role"] == "param"
    assert tensors["l1"]["role"] == "activation"
    assert tensors["out"]["role"] == "output"


def test_heatmaps_are_downsampled_within_max_cells(article):
    x_map = article["gradients"]["x"]["heatmap"]
    cells = len(x_map["z"]) * len(x_map["z"][0])
    assert cells <= 4096
    assert x_map["row_block"] * len(x_map["z"]) >= 1000
    assert x_map["col_block"] * len(x_map["z"][0]) >= 784
    b1_map = article["gradients"]["b1"]["heatmap"]
    assert (b1_map["row_block"], b1_map["col_block"], len(b1_map["z"])) == (1, 1, 1)


def test_heatmap_is_exact_when_it_fits(client):
    response = client.post(
        "/api/run", json={"batch": 8, "in_features": 6, "hidden": [4], "max_cells": 48}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["gradients"]["x"]["heatmap"]["row_block"] == 1
    assert len(body["gradients"]["x"]["heatmap"]["z"]) == 8
    z = torch.tensor(body["gradients"]["x"]["heatmap"]["z"])
    assert z.abs().sum() > 0


def test_batch_list_gives_leading_dims(client):
    response = client.post("/api/run", json={"batch": [4, 16], "in_features": 6, "hidden": [5]})
    assert response.status_code == 200
    body = response.json()
    assert body["tensors"]["x"]["shape"] == [4, 16, 6]
    assert body["gradients"]["x"]["heatmap"]["rows"] == 64  # (4*16, 6)
    step_shapes = {tuple(s["output"]) for e in body["backward"] for s in e["steps"]}
    assert (4, 16, 6, 5) in step_shapes
    assert body["check"]["all_close"] is True


def test_response_is_strict_json(client):
    response = client.post("/api/run", json={"batch": 4, "in_features": 3, "hidden": [2]})
    assert response.status_code == 200
    json.loads(response.text, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))


@pytest.mark.parametrize(
    "body, field",
    [
        ({"batch": 0}, "batch"),
        ({"batch": -5}, "batch"),
        ({"batch": [4, 0]}, "batch"),
        ({"batch": [1, 2, 3, 4, 5]}, "batch"),
        ({"batch": "many"}, "batch"),
        ({"batch": True}, "batch"),
        ({"in_features": 0}, "in_features"),
        ({"in_features": 2.5}, "in_features"),
        ({"hidden": [50, -1]}, "hidden"),
        ({"hidden": [8] * 9}, "hidden"),
        ({"hidden": 50}, "hidden"),
        ({"out_features": 0}, "out_features"),
        ({"activation": "gelu"}, "activation"),
        ({"dtype": "float16"}, "dtype"),
        ({"seed": -1}, "seed"),
        ({"max_cells": 0}, "max_cells"),
        ({"init_scale": "big"}, "init_scale"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_bad_input_is_a_422_naming_the_field(client, body, field):
    response = client.post("/api/run", json=body)
    assert response.status_code == 422
    locs = [err["loc"] for err in response.json()["detail"]]
    assert any(len(loc) > 1 and loc[1] == field for loc in locs), locs


@pytest.mark.parametrize(
    "body, field",
    [
        ({"batch": 1_000_000}, "batch"),
        ({"batch": [1000, 1000]}, "batch"),
        ({"in_features": 16384, "hidden": [4096] * 8, "batch": 1}, "hidden"),
        ({"in_features": 16384, "hidden": [4096, 1], "batch": 1}, "in_features"),
    ],
)
def test_over_the_memory_budget_is_refused_before_allocating(client, body, field):
    response = client.post("/api/run", json=body)
    assert response.status_code == 422
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", field]
    assert "memory budget" in detail["msg"] and "GiB" in detail["msg"]
    # the refusal itself, in this thread (TestClient runs the app in another one, out of
    # PeakMemory's sight): shapes only, not one byte of tensor storage allocated
    with PeakMemory() as memory, pytest.raises(RequestValidationError) as refused:
        admit(RunRequest(**body), Settings())
    assert memory.peak_bytes == 0
    assert refused.value.errors()[0]["loc"] == ("body", field)


def test_article_widths_at_batch_20000_fit_the_budget(client):
    response = client.post("/api/run", json={"batch": 20000, "max_cells": 64})
    assert response.status_code == 200
    assert response.json()["check"]["all_close"] is True


@pytest.mark.parametrize(
    "a, b, result",
    [
        ([1000, 1, 50], [784, 50], [1000, 784, 50]),
        ([], [3], [3]),
        ([2, 1], [1, 5], [2, 5]),
    ],
)
def test_broadcast_rule(client, a, b, result):
    response = client.post("/api/broadcast", json={"a": a, "b": b})
    assert response.status_code == 200
    assert response.json()["result"] == result
    assert response.json()["result"] == list(torch.broadcast_shapes(tuple(a), tuple(b)))


def test_broadcast_clash_names_the_dim_and_both_sizes(client):
    response = client.post("/api/broadcast", json={"a": [2, 3], "b": [4]})
    assert response.status_code == 422
    assert response.json()["detail"][0]["msg"].startswith("dim -1: a has 3, b has 4")


def test_docs_and_schema_are_served(client):
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    run = schema["components"]["schemas"]["RunRequest"]["properties"]
    assert run["hidden"]["maxItems"] == 8
    assert math.isfinite(run["init_scale"]["maximum"])


def test_a_batch_over_the_budget_says_how_many_rows_fit_and_names_the_widths():
    """hidden=[4096, 4096] at the default batch: the batch is to blame (one row fits), and the
    message says how many rows would, and which width to shrink instead."""
    import re

    settings = Settings()
    with pytest.raises(RequestValidationError) as refused:
        admit(RunRequest(hidden=[4096, 4096]), settings)
    error = refused.value.errors()[0]
    assert error["loc"] == ("body", "batch") and error["type"] == "memory_budget"
    found = re.search(r"reduce batch to about (\d+) rows or fewer, or hidden", error["msg"])
    assert found, error["msg"]
    rows = int(found.group(1))
    assert 1 <= rows < 1000

    def over_budget(batch: int) -> bool:
        try:
            admit(RunRequest(hidden=[4096, 4096], batch=batch), settings)
        except RequestValidationError as e:
            return e.errors()[0]["type"] == "memory_budget"
        return False

    assert not over_budget(rows) and over_budget(2 * rows)
