"""POST /api/broadcast against torch: random shape pairs, compatible and not."""

from __future__ import annotations

import re

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

SIZES = st.sampled_from([1, 1, 2, 3, 4])
SHAPES = st.lists(SIZES, min_size=0, max_size=5)


@st.composite
def shape_pairs(draw):
    """Pairs that often broadcast (b derived from a) and sometimes clash."""
    a = draw(SHAPES)
    if draw(st.booleans()):
        b = [draw(st.sampled_from([s, 1])) for s in a[draw(st.integers(0, len(a))) :]]
        if draw(st.booleans()):
            b = [draw(SIZES) for _ in range(draw(st.integers(0, 2)))] + b
        return (a, b) if draw(st.booleans()) else (b, a)
    return a, draw(SHAPES)


def _torch_result(a, b):
    try:
        return list(torch.broadcast_shapes(tuple(a), tuple(b)))
    except RuntimeError:
        return None


@settings(max_examples=150, deadline=None)
@given(shape_pairs())
def test_broadcast_agrees_with_torch(client, pair):
    a, b = pair
    response = client.post("/api/broadcast", json={"a": a, "b": b})
    expected = _torch_result(a, b)
    if expected is None:
        assert response.status_code == 422
        msg = response.json()["detail"][0]["msg"]
        match = re.fullmatch(
            r"dim (-\d+): a has (\d+), b has (\d+); sizes must be equal or one of them 1", msg
        )
        assert match, msg
        dim, sa, sb = (int(g) for g in match.groups())
        assert a[dim] == sa and b[dim] == sb and sa != sb and 1 not in (sa, sb)
        return
    assert response.status_code == 200
    body = response.json()
    assert body["result"] == expected
    for name, shape in (("a", a), ("b", b)):
        rule = body[name]
        assert rule["aligned"] == [1] * (len(expected) - len(shape)) + shape
        assert rule["expanded"] == [
            d for d, (s, r) in enumerate(zip(rule["aligned"], expected)) if s == 1 and r > 1
        ]
        # a result-shaped gradient, summed over grad_sum_dims and reshaped, is the operand's
        # shape, and equals what autograd sends back through the broadcast
        operand = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        grad = torch.randn(expected, dtype=torch.float64)
        operand.expand(expected).backward(grad)
        dims = rule["grad_sum_dims"]
        summed = grad.sum(dims, keepdim=True) if dims else grad
        assert summed.numel() == operand.numel()
        torch.testing.assert_close(summed.reshape(shape), operand.grad)


def test_the_contract_example(client):
    response = client.post("/api/broadcast", json={"a": [1000, 1, 50], "b": [784, 50]})
    assert response.status_code == 200
    assert response.json() == {
        "result": [1000, 784, 50],
        "a": {"aligned": [1000, 1, 50], "expanded": [1], "grad_sum_dims": [1]},
        "b": {"aligned": [1, 784, 50], "expanded": [0], "grad_sum_dims": [0]},
    }


def test_clash_names_dim_and_sizes(client):
    response = client.post("/api/broadcast", json={"a": [5, 3], "b": [4]})
    assert response.status_code == 422
    assert (
        response.json()["detail"][0]["msg"]
        == "dim -1: a has 3, b has 4; sizes must be equal or one of them 1"
    )
    response = client.post("/api/broadcast", json={"a": [2, 3, 4], "b": [5, 1, 4]})
    assert response.status_code == 422
    assert response.json()["detail"][0]["msg"].startswith("dim -3: a has 2, b has 5")


def test_scalars_and_bad_sizes(client):
    response = client.post("/api/broadcast", json={"a": [], "b": []})
    assert response.status_code == 200
    assert response.json()["result"] == []
    assert client.post("/api/broadcast", json={"a": [0], "b": [1]}).status_code == 422
    assert client.post("/api/broadcast", json={"a": [1] * 9, "b": [1]}).status_code == 422
