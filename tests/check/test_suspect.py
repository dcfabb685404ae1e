"""The `suspect` verdict (issue 22, item 6; contract "The check's verdict"): a gradient within
tolerance whose error is over 10x the built-in formula's own error on the same run and over a
few ulps of its scale. The near-misses of the courses pass the 1e-4 tolerance in float32 and
are flagged; correct formulas, written any way, are not."""

from __future__ import annotations

import pytest

from app.check.suspect import SUSPECT_RATIO
from app.runs import pipeline
from app.schemas import RunRequest

# batchnorm's l1.g in one line (biased variance, as the run's batchnorm)
BATCHNORM = """mu = l1.mean(0, keepdim=True)
var = ((l1 - mu) ** 2).mean(0, keepdim=True)
rstd = (var + 1e-5).rsqrt()
xhat = (l1 - mu) * rstd
g = n1.g * gamma1
N = l1.shape[0]
rstd / N * (N * g - g.sum(0) - xhat * (g * xhat).sum(0))"""
LAYERNORM = """mu = l1.mean(-1, keepdim=True)
var = ((l1 - mu) ** 2).mean(-1, keepdim=True)
rstd = (var + 1e-5).rsqrt()
xhat = (l1 - mu) * rstd
g = n1.g * gamma1
H = l1.shape[-1]
rstd / H * (H * g - g.sum(-1, keepdim=True) - xhat * (g * xhat).sum(-1, keepdim=True))"""
# makemore part 4's one-liner: Bessel's n-1 in the variance and the n/(n-1) it brings
MAKEMORE = """N = l1.shape[0]
mu = l1.mean(0, keepdim=True)
diff = l1 - mu
var = (diff ** 2).sum(0, keepdim=True) / (N - 1)
var_inv = (var + 1e-5) ** -0.5
raw = diff * var_inv
g = n1.g * gamma1
var_inv / N * (N * g - g.sum(0) - N / (N - 1) * raw * (g * raw).sum(0))"""
NO_EPS = "(var + 1e-5).rsqrt()", "var.rsqrt()"

NEAR_MISSES = [
    ("batchnorm, eps dropped", {"norm": "batchnorm", "init": "kaiming", "init_scale": 0.3},
     BATCHNORM.replace(*NO_EPS)),
    ("layernorm, eps dropped", {"norm": "layernorm", "init": "kaiming"},
     LAYERNORM.replace(*NO_EPS)),
    ("Bessel at batch 20000", {"norm": "batchnorm", "batch": 20000, "in_features": 64,
                               "strategy": "matmul"}, MAKEMORE),
]  # fmt: skip
RIGHT = [
    ("batchnorm", {"norm": "batchnorm", "init": "kaiming", "init_scale": 0.3}, BATCHNORM),
    ("layernorm", {"norm": "layernorm", "init": "kaiming"}, LAYERNORM),
    ("Bessel's formula at batch 20000, written right",
     {"norm": "batchnorm", "batch": 20000, "in_features": 64, "strategy": "matmul"}, BATCHNORM),
]  # fmt: skip


def check_of(config: dict, formulas: dict) -> dict:
    return pipeline.run(RunRequest(**config, formulas=formulas), 4 << 20)["check"]


@pytest.mark.parametrize("label, config, source", NEAR_MISSES, ids=[c[0] for c in NEAR_MISSES])
def test_a_near_miss_passes_the_tolerance_and_is_suspect(label, config, source):
    check = check_of(config, {"l1.g": source})
    assert check["all_close"]  # the tolerance verdict is unchanged
    assert "l1" in check["suspects"], check["suspects"]
    l1 = check["intermediates"]["l1"]
    assert l1["suspect"] and l1["allclose"]
    assert l1["max_abs_err"] > SUSPECT_RATIO * l1["builtin_max_abs_err"]
    # every name listed is flagged on its entry, and the other way round
    flagged = [k for section in ("tensors", "intermediates") for k, c in check[section].items()
               if c["suspect"]]  # fmt: skip
    assert sorted(flagged) == sorted(check["suspects"])


@pytest.mark.parametrize("label, config, source", RIGHT, ids=[c[0] for c in RIGHT])
def test_a_right_formula_is_not_suspect(label, config, source):
    check = check_of(config, {"l1.g": source})
    assert check["all_close"] and check["suspects"] == []


@pytest.mark.parametrize(
    "config, formulas",
    [
        ({"batch": 20000}, {"w1.g": "x.t() @ l1.g", "x.g": "l1.g @ w1.T"}),
        ({"batch": 20000}, {"w1.g": "torch.einsum('ni,nj->ij', x, l1.g)"}),
        ({}, {"x.g": "(l1.g.unsqueeze(1) * w1).sum(-1)", "a1.g": "out.g @ w2.T"}),
    ],
)
def test_another_way_of_summing_is_rounding_not_suspect(config, formulas):
    """A matmul rounds differently from the built-in broadcast form: not suspect."""
    check = check_of(config, formulas)
    assert check["all_close"] and check["suspects"] == [], check["suspects"]


def test_without_formulas_nothing_is_suspect_and_the_fields_are_there(client):
    r = client.post("/api/run", json={"batch": 8, "in_features": 6, "hidden": [4]})
    check = r.json()["check"]
    assert check["suspects"] == []
    assert all(c["suspect"] is False for c in check["tensors"].values())


def test_the_response_carries_the_verdict(client):
    config = {"norm": "layernorm", "init": "kaiming", "batch": 1000}
    r = client.post("/api/run", json={**config, "formulas": {"l1.g": LAYERNORM.replace(*NO_EPS)}})
    assert r.status_code == 200, r.text[:300]
    check = r.json()["check"]
    assert check["all_close"] and "l1" in check["suspects"]
    assert check["intermediates"]["l1"]["suspect"] is True
    assert check["intermediates"]["l1"]["builtin_max_abs_err"] > 0
