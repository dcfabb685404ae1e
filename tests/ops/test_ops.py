"""Each op alone: its manual backward against autograd, its trace against real shapes, and
its formula strings evaluated on shapes. Plus the broadcasting rule and unbroadcast."""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest
import torch

from app.engine.network import Network
from app.engine.tensors import input_specs, make_tensors
from app.ops import Op, Traced, broadcast_rule, unbroadcast
from app.ops.broadcast import BroadcastError
from app.runs import pipeline
from app.schemas import RunRequest

ELEMENTWISE = {
    "relu": torch.relu,
    "leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, 0.01),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


@pytest.mark.parametrize("kind", sorted(ELEMENTWISE))
@pytest.mark.parametrize("shape", [(5,), (4, 3), (2, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_activation_backward_matches_autograd(kind, shape, dtype):
    z = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    g = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
    op = Op.registry[kind](["z"], "a")
    out = op.forward(Traced.leaf(z, "z"))
    leaf = z.clone().requires_grad_()
    reference = ELEMENTWISE[kind](leaf)
    torch.testing.assert_close(out.t, reference.detach())
    reference.backward(g)
    manual = op.backward(Traced.leaf(g, "a.g"), Traced.leaf(z, "z"), result=Traced.leaf(out.t, "a"))
    torch.testing.assert_close(manual["z"]().t, leaf.grad)


@pytest.mark.parametrize("lead", [(6,), (2, 3), (2, 1, 3)])
@pytest.mark.parametrize("strategy", ["broadcast", "einsum", "matmul"])
def test_linear_backward_matches_autograd(lead, strategy):
    from app.ops import Context

    gen = torch.Generator().manual_seed(0)
    x, w, b = (
        torch.randn(*lead, 5, generator=gen),
        torch.randn(5, 4, generator=gen),
        torch.randn(4, generator=gen),
    )
    g = torch.randn(*lead, 4, generator=gen)
    op = Op.registry["linear"](["x", "w", "b"], "out")
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    (leaves[0] @ leaves[1] + leaves[2]).backward(g)
    out = x @ w + b
    manual = op.compute_backward(g, [x, w, b], out, Context(strategy, chunk_bytes=5 * 4 * 4))
    for name, leaf in zip("xwb", leaves):
        torch.testing.assert_close(manual[name], leaf.grad)


def _namespace(shapes: dict[str, list[int]], dtype: torch.dtype) -> dict:
    """Names as the code strings use them: `l1` a tensor, `l1.g` its gradient, on meta."""
    ns: dict = {"torch": torch}
    for name, shape in shapes.items():
        base, _, grad = name.partition(".")
        t = torch.empty(shape, dtype=dtype, device="meta")
        if grad:
            holder = ns.get(base)
            wrapper = SimpleNamespace(g=t)
            if isinstance(holder, torch.Tensor):
                ns[base] = _TensorWithGrad(holder, t)
            elif holder is None:
                ns[base] = wrapper
            else:
                holder.g = t
        else:
            holder = ns.get(base)
            ns[base] = _TensorWithGrad(t, holder.g) if isinstance(holder, SimpleNamespace) else t
    return ns


class _TensorWithGrad(torch.Tensor):
    """A meta tensor that also answers `.g`, as the article's tensors do."""

    def __new__(cls, t, g):
        out = t.as_subclass(cls)
        out.g = g
        return out


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"batch": [4, 16], "in_features": 6, "hidden": [4, 3]},
        {"hidden": [], "out_features": 3},
        {"activation": "leaky_relu", "hidden": [8, 8]},
        {"activation": "tanh", "dtype": "float64"},
        {"activation": "sigmoid", "batch": [2, 3, 4]},
    ],
)
def test_code_strings_evaluate_to_the_traced_shapes(fields):
    """Every forward and backward `code` string, run as Python on meta tensors of the traced
    shapes, gives the traced shape: the text shown is the computation done."""
    cfg = RunRequest(**fields)
    forward, backward = pipeline.trace(cfg)
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    shapes = {s.name: list(s.shape) for s in input_specs(cfg)}
    for entry in forward:
        ns = _namespace(shapes, dtype)
        lhs, rhs = entry["code"].split(" = ", 1)
        assert lhs == entry["output"]
        assert list(eval(rhs, ns).shape) == entry["shape"], entry["code"]  # noqa: S307
        shapes[entry["output"]] = entry["shape"]
    for entry in backward:
        ns = _namespace(shapes, dtype)
        lhs, rhs = entry["code"].split(" = ", 1)
        assert lhs == f"{entry['grad']}.g"
        assert list(eval(rhs, ns).shape) == entry["shape"] == shapes[entry["grad"]], entry["code"]  # noqa: S307
        assert entry["steps"][-1]["expr"] == rhs
        shapes[lhs] = entry["shape"]


def test_trace_shapes_match_the_real_computation():
    cfg = RunRequest(batch=[3, 5], in_features=7, hidden=[6, 4], out_features=2, activation="tanh")

    forward, backward = pipeline.trace(cfg)
    net = Network.from_config(cfg)
    env = net.forward(make_tensors(cfg))
    for entry in forward:
        assert entry["shape"] == list(env[entry["output"]].shape)
    for entry in backward:
        assert entry["shape"] == list(env[entry["grad"]].shape)
        for step in entry["steps"]:
            assert step["bytes"] >= 1


def test_trace_allocates_nothing():
    """A trace of the article's widths at batch 20000 is shape arithmetic on meta tensors."""
    forward, backward = pipeline.trace(RunRequest(batch=20000))
    product = max((s for e in backward for s in e["steps"]), key=lambda s: s["bytes"])
    assert product["output"] == [20000, 784, 50]
    assert product["bytes"] == 20000 * 784 * 50 * 4  # 3.1 GB, never allocated


def _random_pair(rng: random.Random) -> tuple[tuple[int, ...], tuple[int, ...]]:
    ndim = rng.randint(0, 4)
    base = [rng.choice([1, 2, 3, 5]) for _ in range(ndim)]
    a = [d if rng.random() < 0.7 else rng.choice([1, 4]) for d in base][rng.randint(0, ndim) :]
    b = [d if rng.random() < 0.7 else rng.choice([1, 4]) for d in base][rng.randint(0, ndim) :]
    return tuple(a), tuple(b)


@pytest.mark.parametrize("seed", range(40))
def test_broadcast_rule_agrees_with_torch(seed):
    a, b = _random_pair(random.Random(seed))
    try:
        expected = torch.broadcast_shapes(a, b)
    except RuntimeError:
        with pytest.raises(BroadcastError):
            broadcast_rule(a, b)
        return
    rule = broadcast_rule(a, b)
    assert rule.result == tuple(expected)
    grad = torch.randn(rule.result, dtype=torch.float64)
    for shape, operand in ((a, rule.a), (b, rule.b)):
        assert len(operand.aligned) == len(rule.result)
        # summing the listed dims (keepdim) then reshaping gives exactly the operand's shape
        reduced = grad.sum(operand.grad_sum_dims, keepdim=True) if operand.grad_sum_dims else grad
        assert reduced.reshape(shape).shape == shape
        # and unbroadcast gives the same numbers as autograd through expand
        leaf = torch.randn(shape, dtype=torch.float64).requires_grad_()
        leaf.expand(rule.result).backward(grad)
        torch.testing.assert_close(unbroadcast(Traced.leaf(grad, "g"), shape).t, leaf.grad)


def test_unbroadcast_traces_one_reduce_per_kind_of_dim():
    g = Traced.leaf(torch.empty(7, 4, 5, device="meta"), "g")
    out = unbroadcast(g, (4, 1))
    assert out.shape == (4, 1)
    assert out.expr == "g.sum(0).sum(1, keepdim=True)"
    assert [s["action"] for s in (st.as_dict() for st in out.steps)] == ["reduce", "reduce"]


def test_expressions_are_parenthesized_like_python():
    a, b, c = (Traced.leaf(torch.ones(2), n) for n in "abc")
    assert (a * (b - c)).expr == "a * (b - c)"
    assert ((a - b) * c).expr == "(a - b) * c"
    assert (a - (b - c)).expr == "a - (b - c)"
    assert (1 - a * b).expr == "1 - a * b"
    assert ((a * b).sum(0)).expr == "(a * b).sum(0)"
    for expr, value in [((a * (b - c)), 0.0), ((1 - a * b), 0.0)]:
        assert (
            eval(expr.expr, {"a": torch.ones(2), "b": torch.ones(2), "c": torch.ones(2)}).sum()
            == value
        )  # noqa: S307


def test_every_registered_op_has_a_docstring_with_shapes():
    for kind, cls in Op.registry.items():
        assert cls.__doc__ and "(" in cls.__doc__, kind
    assert {"linear", "relu", "leaky_relu", "tanh", "sigmoid", "mse"} <= set(Op.registry)


def test_op_names_chain_through_the_network():
    cfg = RunRequest(hidden=[3, 2])
    ops = Network.from_config(cfg).ops
    produced = {"x", "target"} | {f"{p}{k}" for p, k in itertools.product(["w", "b"], [1, 2, 3])}
    for op in ops:
        assert set(op.inputs) <= produced, op
        produced.add(op.output)
    assert ops[-1].output == "loss"
