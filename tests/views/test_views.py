"""Heatmap downsampling and stats: the only place the page's numbers are reduced."""

from __future__ import annotations

import math

import pytest
import torch

from app.views import heatmap
from app.views.heatmap import block_extreme, block_max, block_mean, block_sizes, gradient_view


@pytest.mark.parametrize(
    "rows, cols, max_cells",
    [
        (1000, 784, 4096),
        (1, 100_000, 4096),
        (100_000, 1, 100),
        (784, 50, 4096),
        (7, 3, 1),
        (5, 5, 25),
    ],
)
def test_block_sizes_fit_max_cells_and_cover_the_tensor(rows, cols, max_cells):
    rb, cb = block_sizes(rows, cols, max_cells)
    assert math.ceil(rows / rb) * math.ceil(cols / cb) <= max_cells
    assert 1 <= rb <= rows and 1 <= cb <= cols
    if rows * cols <= max_cells:
        assert (rb, cb) == (1, 1)


def test_block_mean_averages_what_each_edge_block_holds():
    t = torch.arange(15.0).reshape(3, 5)
    z = block_mean(t, 2, 2)
    expected = torch.tensor(
        [
            [(0 + 1 + 5 + 6) / 4, (2 + 3 + 7 + 8) / 4, (4 + 9) / 2],
            [(10 + 11) / 2, (12 + 13) / 2, 14],
        ]
    )
    torch.testing.assert_close(z, expected)


def test_block_extreme_keeps_the_largest_difference_with_its_sign():
    t = torch.tensor([[0.1, -3.0, 0.0], [2.0, 0.5, -0.1]])
    torch.testing.assert_close(block_extreme(t, 2, 2), torch.tensor([[-3.0, -0.1]]))
    # a mean would have hidden these: +1 and -1 in one block average to 0
    assert block_extreme(torch.tensor([[1.0, -1.0]]), 1, 2).item() == 1.0


def test_gradient_view_stats_are_exact_and_nonfinite_counted():
    t = torch.randn(300, 40, dtype=torch.float64)
    t[5, 6] = float("nan")
    view = gradient_view(t, max_cells=100)
    assert view["nonfinite"] == 1
    assert view["heatmap"]["z"].shape[0] * view["heatmap"]["z"].shape[1] <= 100
    clean = torch.randn(30, 20, dtype=torch.float32)
    stats = gradient_view(clean, max_cells=10)["stats"]
    assert stats["min"] == clean.min().item() and stats["max"] == clean.max().item()
    assert stats["mean"] == pytest.approx(clean.double().mean().item(), rel=1e-12)
    assert stats["norm"] == pytest.approx(clean.double().norm().item(), rel=1e-12)


def test_stats_of_a_large_float32_gradient_are_exact_in_passes(monkeypatch):
    """The mean and norm of a gradient larger than one pass (the article's x.g: 784k
    entries) accumulate in float64 pass by pass, no float64 copy of the whole: the same
    numbers as the whole cast, to float64's rounding; non-finite entries still spread."""
    monkeypatch.setattr(heatmap, "STATS_PASS_ENTRIES", 1000)  # 120 passes, the last short
    t = torch.randn(300, 397) * 1e3 + 7.0  # (a mean far from 0: float32 sums would drift)
    total, norm = heatmap.sum_and_norm(t)
    assert total == pytest.approx(t.double().sum().item(), rel=1e-12)
    assert norm == pytest.approx(t.double().norm().item(), rel=1e-12)
    wide = t.double()  # float64: summed as it is
    assert heatmap.sum_and_norm(wide) == (wide.sum().item(), wide.norm().item())
    t[250, 3] = float("inf")
    assert heatmap.sum_and_norm(t) == (math.inf, math.inf)
    t[2, 2] = float("nan")
    assert all(math.isnan(v) for v in heatmap.sum_and_norm(t))
    assert heatmap.sum_and_norm(torch.full((3, 4), 3e38)) == pytest.approx(
        (3.6e39, 1.04e39), rel=0.01
    )


def test_reference_and_difference_heatmaps_share_the_blocks(client):
    response = client.post(
        "/api/run",
        json={
            "batch": 300,
            "in_features": 40,
            "hidden": [8],
            "reference_heatmaps": True,
            "max_cells": 200,
        },
    )
    assert response.status_code == 200
    x = response.json()["gradients"]["x"]
    for key in ("reference_heatmap", "diff_heatmap"):
        assert (x[key]["row_block"], x[key]["col_block"]) == (
            x["heatmap"]["row_block"],
            x["heatmap"]["col_block"],
        )
        assert len(x[key]["z"]) == len(x["heatmap"]["z"])
    scale = max(abs(v) for row in x["reference_heatmap"]["z"] for v in row)
    assert max(abs(v) for row in x["diff_heatmap"]["z"] for v in row) <= 1e-5 * scale
    plain = client.post("/api/run", json={"batch": 3, "in_features": 4, "hidden": [2]}).json()
    assert "reference_heatmap" not in plain["gradients"]["x"]


TOL_NET = {"batch": 64, "in_features": 12, "hidden": [6], "reference_heatmaps": True}


def _cells(hm):
    return [v for row in hm["z"] for v in row]


@pytest.mark.parametrize("max_cells", [1_000_000, 40])
def test_tolerance_heatmap_is_at_most_one_exactly_when_the_check_passes(client, max_cells):
    body = {**TOL_NET, "max_cells": max_cells}
    good = client.post("/api/run", json=body).json()
    # wrong wherever x <= 0: the gradient is zeroed there
    bad = client.post(
        "/api/run", json={**body, "formulas": {"x.g": "(l1.g @ w1.T) * (x > 0).float()"}}
    ).json()
    for data in (good, bad):
        for name, g in data["gradients"].items():
            hm = g["tolerance_heatmap"]
            assert (hm["row_block"], hm["col_block"]) == (
                g["heatmap"]["row_block"],
                g["heatmap"]["col_block"],
            )
            worst = max(_cells(hm))
            assert (worst <= 1) == data["check"]["tensors"][name]["allclose"], (name, worst)
    assert good["check"]["all_close"] and not bad["check"]["tensors"]["x"]["allclose"]


def test_tolerance_heatmap_lights_up_exactly_where_the_formula_is_wrong(client):
    body = {**TOL_NET, "max_cells": 1_000_000}  # every cell is one entry
    bad = client.post(
        "/api/run", json={**body, "formulas": {"x.g": "(l1.g @ w1.T) * (x > 0).float()"}}
    ).json()
    x = bad["gradients"]["x"]
    c = bad["check"]["tensors"]["x"]
    manual, ref, ratio = (
        _cells(x[k]) for k in ("heatmap", "reference_heatmap", "tolerance_heatmap")
    )
    wrong = [abs(m - r) > c["atol"] + c["rtol"] * abs(r) for m, r in zip(manual, ref)]
    assert any(wrong) and not all(wrong)
    assert [q > 1 for q in ratio] == wrong
    zeroed = [m == 0 and r != 0 for m, r in zip(manual, ref)]
    assert all(z or q <= 1 for z, q in zip(zeroed, ratio))  # only the zeroed entries light up


@pytest.mark.parametrize(
    "rows, cols, row_block, col_block",
    [(1000, 784, 13, 15), (7, 5, 3, 2), (1, 9, 1, 4), (6, 4, 6, 4), (5, 8, 2, 8)],
)
def test_block_extremes_are_max_pool2ds_whatever_the_edges(rows, cols, row_block, col_block):
    """The folded min and max give max_pool2d's (ceil_mode) answer, non-finite entries too."""
    t = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols))
    t[0, -1], t[-1, 0] = float("nan"), float("-inf")
    pool = dict(kernel_size=(row_block, col_block), stride=(row_block, col_block), ceil_mode=True)
    high = torch.nn.functional.max_pool2d(t[None, None], **pool)[0, 0]
    low = -torch.nn.functional.max_pool2d(-t[None, None], **pool)[0, 0]
    expected = torch.where(low.abs() > high.abs(), low, high)
    torch.testing.assert_close(
        block_extreme(t, row_block, col_block), expected, equal_nan=True, rtol=0, atol=0
    )
    torch.testing.assert_close(
        block_max(t, row_block, col_block), high, equal_nan=True, rtol=0, atol=0
    )
