"""POST /api/run's `follow`: one gradient element traced back to the products its formula's
reduction sums, checked against an independent autograd with l1's gradient retained.

Tolerances. A product is the run's own float32 multiply of the two factors it lists, so it
is compared exactly. A factor that is a gradient (l1.g) is the manual backward's, autograd's
to float32 rounding (rtol 1e-5 of the row's scale). `sum` adds every product in float64;
`value` is the gradient the run computed, and autograd's element another float32 sum in
another order, so each is within terms * eps(float32) * sum|product| of the sum (the
standard bound for a float32 sum of `terms` products); in practice far closer.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from app.schemas import RunResponse
from tests.scripts import run_script

EPS32 = torch.finfo(torch.float32).eps


def reference(batch=1000, n_in=784, hidden=50, seed=0, formula_l1=None):
    """The article's net made as API.md says, written out here (not app/): gradients by
    loss.backward(), with l1's and a1's retained."""
    lead = (batch,) if isinstance(batch, int) else tuple(batch)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n_in, generator=g)
    target = torch.randn(*lead, generator=g)
    w1 = torch.randn(n_in, hidden, generator=g)
    b1 = torch.randn(hidden, generator=g)
    w2 = torch.randn(hidden, 1, generator=g)
    b2 = torch.randn(1, generator=g)
    leaves = {
        n: t.clone().requires_grad_() for n, t in dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2).items()
    }
    l1 = leaves["x"] @ leaves["w1"] + leaves["b1"]
    a1 = torch.relu(l1)
    out = a1 @ leaves["w2"] + leaves["b2"]
    l1.retain_grad()
    a1.retain_grad()
    out.retain_grad()
    (out.squeeze(-1) - target).pow(2).mean().backward()
    tensors = {n: t.detach() for n, t in leaves.items()}
    grads = {n: t.grad for n, t in leaves.items()}
    grads.update(l1=l1.grad, a1=a1.grad, out=out.grad)
    return tensors, grads


@pytest.fixture(scope="module")
def article():
    return reference()


def post_follow(client, grad, index, **config):
    response = client.post("/api/run", json={**config, "follow": {"grad": grad, "index": index}})
    assert response.status_code == 200, response.text
    return response.json()


def f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def assert_products_are_their_factors(follow):
    for term in follow["terms"]:
        factors = [f32(v) for v in term["factors"].values()]
        product = factors[0]
        for f in factors[1:]:
            product = product * f
        assert f32(term["product"]) == product, term  # the run's own float32 multiply


def assert_sum_and_value(follow, autograd_value):
    bound = follow["terms_total"] * EPS32 * follow["abs_sum"] + 1e-30
    products = [t["product"] for t in follow["terms"]]
    if len(products) == follow["terms_total"]:
        assert follow["sum"] == pytest.approx(math.fsum(products), rel=1e-12, abs=1e-300)
    assert abs(follow["sum"] - follow["value"]) <= bound
    assert abs(follow["sum"] - autograd_value) <= bound
    assert abs(follow["value"] - autograd_value) <= bound


def test_x_g_element_is_50_products_of_l1_g_and_w1(client, article):
    tensors, grads = article
    body = post_follow(client, "x.g", [3, 100])
    f = body["follow"]
    assert f["grad"] == "x.g" and f["index"] == [3, 100]
    assert f["terms_total"] == 50 and len(f["terms"]) == 50
    assert f["formula"] == "x.g[3, 100] = (l1.g[3, :] * w1[100, :]).sum()"
    assert f["product_shape"] == [1000, 784, 50] and f["slice"] == [3, 100, None]
    assert f["factor_index"] == {"l1.g": [3, None], "w1": [100, None]}
    assert f["source"] == "reference"
    l1g, w1 = grads["l1"][3], tensors["w1"][100]  # (50,), (50,)
    scale = l1g.abs().max().item()
    for k, term in enumerate(f["terms"]):
        assert term["index"] == [3, 100, k]
        assert set(term["factors"]) == {"l1.g", "w1"}
        assert term["factors"]["w1"] == w1[k].item()  # a parameter: exact
        assert term["factors"]["l1.g"] == pytest.approx(l1g[k].item(), rel=1e-5, abs=1e-6 * scale)
        expected = (l1g[k] * w1[k]).item()
        assert term["product"] == pytest.approx(
            expected, rel=1e-5, abs=1e-6 * scale * w1.abs().max().item()
        )
    assert_products_are_their_factors(f)
    assert_sum_and_value(f, grads["x"][3, 100].item())
    assert "follow_ms" in body["timing"]
    RunResponse.model_validate(body)  # the response schema in /openapi.json describes it
    assert body["config"]["follow"] == {"grad": "x.g", "index": [3, 100]}


@pytest.mark.parametrize(
    ("grad", "index", "factor_names"),
    [("w1.g", [100, 7], {"x", "l1.g"}), ("b1.g", [7], {"l1.g"})],
)
def test_w1_g_and_b1_g_elements_sum_1000_terms_over_the_batch(
    client, article, grad, index, factor_names
):
    tensors, grads = article
    f = post_follow(client, grad, index)["follow"]
    assert f["terms_total"] == 1000 and len(f["terms"]) == 1000
    assert all(set(t["factors"]) == factor_names for t in f["terms"])
    k = index[-1]
    l1g = grads["l1"][:, k]  # (1000,)
    scale = grads["l1"].abs().max().item()
    for n, term in enumerate(f["terms"]):
        assert term["index"] == [n, *index]  # into (1000, 784, 50) for w1.g, (1000, 50) for b1.g
        assert term["factors"]["l1.g"] == pytest.approx(l1g[n].item(), rel=1e-5, abs=1e-6 * scale)
        if grad == "w1.g":
            assert term["factors"]["x"] == tensors["x"][n, index[0]].item()
    expected = l1g * tensors["x"][:, index[0]] if grad == "w1.g" else l1g
    got = torch.tensor([t["product"] for t in f["terms"]])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    assert_products_are_their_factors(f)
    assert_sum_and_value(f, grads[grad.removesuffix(".g")][tuple(index)].item())


def test_second_layer_a1_g_sums_out_g_times_w2(client, article):
    tensors, grads = article
    f = post_follow(client, "a1.g", [5, 9])["follow"]
    assert f["formula"] == "a1.g[5, 9] = (out.g[5, :] * w2[9, :]).sum()"
    assert f["terms_total"] == 1 and f["terms"][0]["index"] == [5, 9, 0]
    assert f["terms"][0]["factors"]["w2"] == tensors["w2"][9, 0].item()
    assert f["terms"][0]["factors"]["out.g"] == pytest.approx(grads["out"][5, 0].item(), rel=1e-5)
    assert_sum_and_value(f, grads["a1"][5, 9].item())


def test_batch_dims_index_every_leading_dim(client):
    config = dict(batch=[4, 16], in_features=12, hidden=[8], seed=2)
    tensors, grads = reference(batch=(4, 16), n_in=12, hidden=8, seed=2)
    f = post_follow(client, "x.g", [2, 9, 5], **config)["follow"]
    assert f["formula"] == "x.g[2, 9, 5] = (l1.g[2, 9, :] * w1[5, :]).sum()"
    assert [t["index"] for t in f["terms"]] == [[2, 9, 5, k] for k in range(8)]
    assert_sum_and_value(f, grads["x"][2, 9, 5].item())
    f = post_follow(client, "w1.g", [3, 5], **config)["follow"]
    assert f["formula"] == "w1.g[3, 5] = (x[:, :, 3] * l1.g[:, :, 5]).sum()"
    assert f["product_shape"] == [4, 16, 12, 8] and f["slice"] == [None, None, 3, 5]
    assert f["factor_index"] == {"x": [None, None, 3], "l1.g": [None, None, 5]}
    assert [t["index"] for t in f["terms"]] == [[a, b, 3, 5] for a in range(4) for b in range(16)]
    for term in f["terms"]:
        a, b = term["index"][:2]
        assert term["factors"]["x"] == tensors["x"][a, b, 3].item()
    assert_products_are_their_factors(f)
    assert_sum_and_value(f, grads["w1"][3, 5].item())


def test_terms_past_the_cut_are_counted_and_summed(client):
    tensors, grads = reference(batch=5000, n_in=20, hidden=6, seed=1)
    f = post_follow(client, "w1.g", [4, 2], batch=5000, in_features=20, hidden=[6], seed=1)[
        "follow"
    ]
    assert f["terms_total"] == 5000 and len(f["terms"]) == 4096
    assert f["terms"][-1]["index"] == [4095, 4, 2]
    every = (tensors["x"][:, 4] * grads["l1"][:, 2]).double()
    assert f["sum"] == pytest.approx(
        every.sum().item(), rel=1e-4, abs=1e-6 * every.abs().sum().item()
    )
    shown = math.fsum(t["product"] for t in f["terms"])
    assert abs(shown - f["sum"]) > 0  # the cut terms are in the sum, not only the shown ones
    assert_sum_and_value(f, grads["w1"][4, 2].item())


def test_learner_formula_terms_use_the_gradient_the_run_used(client, article):
    """With a wrong l1.g (the relu mask dropped), x.g's terms multiply that l1.g: the value is
    the sum of those terms, and both differ from autograd's."""
    tensors, grads = article
    response = client.post(
        "/api/run",
        json={"formulas": {"l1.g": "a1.g"}, "follow": {"grad": "x.g", "index": [3, 100]}},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["check"]["tensors"]["x"]["allclose"] is False
    f = body["follow"]
    a1g = grads["a1"][3]  # what the learner's l1.g is: no mask
    for k, term in enumerate(f["terms"]):
        assert term["factors"]["l1.g"] == pytest.approx(a1g[k].item(), rel=1e-5, abs=1e-7)
    users = (a1g @ tensors["w1"][100]).item()
    assert_sum_and_value(f, users)
    assert abs(f["value"] - grads["x"][3, 100].item()) > 1e-3 * abs(users)  # not autograd's


def test_learner_formula_for_the_followed_gradient_is_marked_user(client, article):
    _, grads = article
    response = client.post(
        "/api/run",
        json={
            "formulas": {"x.g": "l1.g @ w1.T"},
            "follow": {"grad": "x.g", "index": [7, 3]},
        },
    )
    assert response.status_code == 200, response.text
    f = response.json()["follow"]
    assert f["source"] == "user"
    assert_sum_and_value(f, grads["x"][7, 3].item())


def test_layernorm_net_follows_its_linear_layers(client):
    config = dict(batch=32, in_features=10, hidden=[8], norm="layernorm", out_features=3)
    body = post_follow(client, "w1.g", [2, 3], **config)
    f = body["follow"]
    assert f["terms_total"] == 32
    assert_products_are_their_factors(f)
    assert abs(f["sum"] - f["value"]) <= 32 * EPS32 * f["abs_sum"]


def test_no_follow_leaves_the_response_as_it_was(client):
    body = client.post("/api/run", json={"batch": 8, "in_features": 6, "hidden": [4]}).json()
    assert "follow" not in body and "follow" not in body["config"]
    assert "follow_ms" not in body["timing"] or body["timing"]["follow_ms"] is None


@pytest.mark.parametrize(
    ("follow", "field", "words"),
    [
        (
            {"grad": "x.g", "index": [1000, 100]},
            "index",
            ["dim 0", "0 to 999", "1000", "(1000, 784)"],
        ),
        ({"grad": "x.g", "index": [3, 784]}, "index", ["dim 1", "0 to 783", "784"]),
        ({"grad": "x.g", "index": [-1, 2]}, "index", ["dim 0", "0 to 999", "-1"]),
        ({"grad": "b1.g", "index": [50]}, "index", ["dim 0", "0 to 49", "(50,)"]),
        ({"grad": "x.g", "index": [3]}, "index", ["2 entries", "got 1"]),
        ({"grad": "w1.g", "index": [1, 2, 3]}, "index", ["2 entries", "got 3"]),
        ({"grad": "l1.g", "index": [3, 4]}, "grad", ["'l1.g'", "x.g", "w1.g", "b1.g", "a1.g"]),
        ({"grad": "w9.g", "index": [0, 0]}, "grad", ["'w9.g'", "w2.g"]),
    ],
)
def test_a_bad_follow_is_a_422_naming_the_field_and_the_limit(client, follow, field, words):
    response = client.post("/api/run", json={"follow": follow})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "follow", field]
    for word in words:
        assert word in error["msg"], (word, error["msg"])


@pytest.mark.parametrize(
    "follow",
    [
        {"grad": "x.g"},
        {"grad": "x.g", "index": [1, 2], "x": 1},
        {"grad": "x.g", "index": ["a", 1]},
        {"grad": "x.g", "index": [1, 2], "block": {"rows": [0, 1], "cols": [0, 1]}},
    ],
)
def test_a_malformed_follow_is_a_422_at_follow(client, follow):
    response = client.post("/api/run", json={"follow": follow})
    assert response.status_code == 422
    assert all(e["loc"][:2] == ["body", "follow"] for e in response.json()["detail"])


def test_export_refuses_a_bad_follow_under_config(client):
    response = client.post(
        "/api/export", json={"config": {"follow": {"grad": "x.g", "index": [1000, 0]}}}
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "config", "follow", "index"]


@pytest.mark.parametrize(
    ("grad", "block"),
    [("x.g", {"rows": [10, 20], "cols": [13, 26]}), ("b1.g", {"rows": [0, 1], "cols": [0, 50]})],
)
def test_a_block_follows_its_element_of_largest_magnitude(client, article, grad, block):
    """A downsampled heatmap's cell: the element it shows (the block's extreme) is followed."""
    _, grads = article
    response = client.post("/api/run", json={"follow": {"grad": grad, "block": block}})
    assert response.status_code == 200, response.text
    f = response.json()["follow"]
    g = grads[grad.removesuffix(".g")]
    g2 = g.reshape(1, -1) if g.ndim == 1 else g
    (r0, r1), (c0, c1) = block["rows"], block["cols"]
    row, col = (0, f["index"][0]) if g.ndim == 1 else f["index"]
    assert r0 <= row < r1 and c0 <= col < c1
    assert abs(g2[row, col].item()) == pytest.approx(g2[r0:r1, c0:c1].abs().max().item(), rel=1e-5)
    assert f["value"] == pytest.approx(g2[row, col].item(), rel=1e-5)


@pytest.mark.parametrize(
    ("follow", "field"),
    [
        ({"grad": "x.g", "block": {"rows": [10, 1001], "cols": [0, 4]}}, "block"),
        ({"grad": "x.g", "block": {"rows": [5, 5], "cols": [0, 4]}}, "block"),
        ({"grad": "b1.g", "block": {"rows": [0, 2], "cols": [0, 4]}}, "block"),
    ],
)
def test_a_block_out_of_the_view_is_a_422(client, follow, field):
    response = client.post("/api/run", json={"follow": follow})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "follow", field]
    assert "0 <= start < stop <=" in error["msg"]


def norm_reference(norm: str, lead=(4, 8), n_in=10, hidden=6, seed=4):
    """linear -> norm -> relu -> linear -> mse as API.md makes it, by torch.nn.functional
    (not app/), with n1's gradient retained and xhat computed on its own."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n_in, generator=g)
    target = torch.randn(*lead, generator=g)
    w1 = torch.randn(n_in, hidden, generator=g)
    b1 = torch.randn(hidden, generator=g)
    gamma1 = 1 + 0.1 * torch.randn(hidden, generator=g)
    beta1 = 0.1 * torch.randn(hidden, generator=g)
    w2 = torch.randn(hidden, 1, generator=g)
    b2 = torch.randn(1, generator=g)
    p = {n: t.clone().requires_grad_() for n, t in dict(gamma1=gamma1, beta1=beta1).items()}
    l1 = x @ w1 + b1
    if norm == "layernorm":
        n1 = torch.nn.functional.layer_norm(l1, (hidden,), p["gamma1"], p["beta1"], eps=1e-5)
        xhat = torch.nn.functional.layer_norm(l1, (hidden,), eps=1e-5)
    else:
        flat = l1.reshape(-1, hidden)
        xhat = ((flat - flat.mean(0)) / (flat.var(0, unbiased=False) + 1e-5).sqrt()).reshape(
            l1.shape
        )
        n1 = xhat * p["gamma1"] + p["beta1"]
    n1.retain_grad()
    out = torch.relu(n1) @ w2 + b2
    (out.squeeze(-1) - target).pow(2).mean().backward()
    return n1.grad, xhat.detach(), {n: t.grad for n, t in p.items()}


@pytest.mark.parametrize("norm", ["layernorm", "batchnorm"])
@pytest.mark.parametrize("grad", ["gamma1.g", "beta1.g"])
def test_a_norms_gamma_and_beta_elements_sum_over_the_batch(client, norm, grad):
    n1g, xhat, grads = norm_reference(norm)
    config = dict(batch=[4, 8], in_features=10, hidden=[6], norm=norm, seed=4)
    f = post_follow(client, grad, [2], **config)["follow"]
    assert f["terms_total"] == 32 and f["product_shape"] == [4, 8, 6]
    gamma = grad == "gamma1.g"
    expected = "(n1.g[:, :, 2] * xhat[:, :, 2]).sum()" if gamma else "n1.g[:, :, 2].sum()"
    assert f["formula"] == f"{grad}[2] = {expected}"
    scale = n1g.abs().max().item()
    for term in f["terms"]:
        a, b, j = term["index"]
        assert term["factors"]["n1.g"] == pytest.approx(
            n1g[a, b, j].item(), rel=1e-4, abs=1e-6 * scale
        )
        if gamma:
            assert term["factors"]["xhat"] == pytest.approx(
                xhat[a, b, j].item(), rel=1e-4, abs=1e-5
            )
    assert_products_are_their_factors(f)
    assert_sum_and_value(f, grads[grad.removesuffix(".g")][2].item())


@pytest.mark.parametrize(
    "config",
    [
        dict(batch=[2, 4], in_features=6, hidden=[4, 3], follow={"grad": "w1.g", "index": [5, 2]}),
        dict(
            batch=8,
            in_features=6,
            hidden=[4, 3],
            norm="layernorm",
            follow={"grad": "gamma1.g", "index": [1]},
        ),
    ],
    ids=["linear", "layernorm"],
)
@pytest.mark.slow
def test_the_exported_script_prints_the_followed_elements_check(client, tmp_path, config):
    response = client.post("/api/export", json={"config": config, "format": "py"})
    assert response.status_code == 200, response.text
    path = tmp_path / "run.py"
    path.write_text(response.text)
    done = run_script([path.name], cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    api = post_follow(
        client,
        config["follow"]["grad"],
        config["follow"]["index"],
        **{k: v for k, v in config.items() if k != "follow"},
    )["follow"]
    target = f"{api['grad']}[{', '.join(map(str, api['index']))}]"
    line = re.search(
        rf"^follow {re.escape(target)}: (\d+) terms, sum (\S+), value (\S+), \|sum - value\| \S+ \(rounding allows (\S+)\)$",
        done.stdout,
        re.M,
    )
    assert line, done.stdout
    terms, total, value, bound = int(line[1]), float(line[2]), float(line[3]), float(line[4])
    assert terms == api["terms_total"]
    assert value == pytest.approx(api["value"], rel=1e-7)  # the same gradient, bit for bit
    assert abs(total - value) <= bound
    assert total == pytest.approx(api["sum"], rel=1e-5, abs=bound)
