"""Ops that compute on plain tensors (compute_forward / compute_backward overrides, used by
every run and by training) give exactly the numbers of their traced formulas."""

from __future__ import annotations

import pytest
import torch

from app.ops import Context, Op, Traced

SHAPES = [(7, 10), (3, 4, 5), (1, 3)]


def leaves(op: Op, xs):
    return [Traced.leaf(x, n) for x, n in zip(xs, op.inputs)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_plain_tensors_equal_its_traced_formulas(shape, dtype):
    g = torch.Generator().manual_seed(1)
    out = torch.randn(*shape, generator=g, dtype=dtype)
    out[..., 1] = out[..., 0]  # ties at the max, where the max's gradient splits
    target = torch.randint(shape[-1], shape[:-1], generator=g)
    op = Op.registry["cross_entropy"](["out", "target"], "loss")
    result = op.forward(*leaves(op, [out, target])).t
    assert torch.equal(op.compute_forward([out, target]), result)
    fast = op.compute_backward(None, [out, target], result, Context())
    traced = Op.compute_backward(op, None, [out, target], result, Context())
    assert fast.keys() == traced.keys() == {"out", "out:fused"}
    for key in traced:
        assert torch.equal(fast[key], traced[key]), key
    only_main = op.compute_backward(None, [out, target], result, Context(variants=False))
    assert only_main.keys() == {"out"}


@pytest.mark.parametrize("strategy", ["broadcast", "einsum", "matmul"])
def test_linear_forward_on_plain_tensors_and_a_skipped_input_gradient(strategy):
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(6, 4, generator=g), torch.randn(4, 3, generator=g), torch.randn(3)
    op = Op.registry["linear"](["x", "w1", "b1"], "l1")
    result = op.forward(*leaves(op, [x, w, b])).t
    assert torch.equal(op.compute_forward([x, w, b]), result)
    upstream = torch.randn(6, 3, generator=g)
    full = op.compute_backward(upstream, [x, w, b], result, Context(strategy))
    skipped = op.compute_backward(
        upstream, [x, w, b], result, Context(strategy, skip=frozenset({"x"}))
    )
    assert set(full) == {"x", "w1", "b1"} and set(skipped) == {"w1", "b1"}
    for name in skipped:
        assert torch.equal(skipped[name], full[name])
