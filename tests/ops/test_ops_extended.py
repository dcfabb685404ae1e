"""The ops beyond the article (cross_entropy, layernorm, batchnorm): manual gradients against
autograd alone and inside networks, across leading dims, dtypes, depths and both losses;
every `code` string run as Python on the real tensors gives the manual gradient."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from app.check.autograd import autograd_check
from app.engine.network import Network
from app.engine.tensors import make_tensors
from app.ops import Context, Op, Traced
from app.runs import pipeline
from app.schemas import RunRequest

LEADS = [[4, 3], 5]
DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _lead(batch):
    return (batch,) if isinstance(batch, int) else tuple(batch)


def _rand(shape, dtype, seed):
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _run_op(op: Op, xs: list[torch.Tensor], g: torch.Tensor | None):
    out = op.forward(*(Traced.leaf(x, n) for x, n in zip(xs, op.inputs))).t
    return out, op.compute_backward(g, xs, out, Context())


@pytest.mark.parametrize("batch", LEADS)
@pytest.mark.parametrize("dtype", DTYPES.values())
@pytest.mark.parametrize("kind", ["layernorm", "batchnorm"])
def test_norm_matches_functional_and_autograd(kind, dtype, batch):
    lead = _lead(batch)
    l, gamma, beta = _rand((*lead, 6), dtype, 1) * 3 + 1, _rand(6, dtype, 2), _rand(6, dtype, 3)  # noqa: E741
    g = _rand((*lead, 6), dtype, 4)
    out, manual = _run_op(Op.registry[kind](["l", "gamma", "beta"], "n"), [l, gamma, beta], g)
    leaves = [t.clone().requires_grad_() for t in (l, gamma, beta)]
    if kind == "layernorm":
        ref = F.layer_norm(leaves[0], (6,), leaves[1], leaves[2], 1e-5)
    else:
        flat = leaves[0].reshape(-1, 6)
        ref = F.batch_norm(flat, None, None, leaves[1], leaves[2], True, 0.0, 1e-5).reshape(l.shape)
    torch.testing.assert_close(out, ref.detach(), **TOL[dtype])
    ref.backward(g)
    for name, leaf in zip(["l", "gamma", "beta"], leaves):
        assert manual[name].shape == leaf.shape
        torch.testing.assert_close(manual[name], leaf.grad, **TOL[dtype])


@pytest.mark.parametrize("batch", LEADS)
@pytest.mark.parametrize("dtype", DTYPES.values())
@pytest.mark.parametrize("classes", [1, 2, 7])
def test_cross_entropy_both_formulas_match_autograd(classes, dtype, batch):
    lead = _lead(batch)
    out = _rand((*lead, classes), dtype, 1) * 4
    target = torch.randint(classes, lead, generator=torch.Generator().manual_seed(2))
    loss, manual = _run_op(
        Op.registry["cross_entropy"](["out", "target"], "loss"), [out, target], None
    )
    leaf = out.clone().requires_grad_()
    ref = F.cross_entropy(leaf.reshape(-1, classes), target.reshape(-1))
    torch.testing.assert_close(loss, ref.detach(), **TOL[dtype])
    ref.backward()
    assert set(manual) == {"out", "out:fused"}
    for key in manual:
        torch.testing.assert_close(manual[key], leaf.grad, **TOL[dtype])


def test_cross_entropy_is_stable_for_huge_logits():
    """Max subtraction: logits of 1e4 give a finite loss and gradient, like F.cross_entropy."""
    out = torch.tensor([[1e4, 0.0, -1e4], [0.0, 3e4, 1.0]])
    target = torch.tensor([1, 1])
    loss, manual = _run_op(
        Op.registry["cross_entropy"](["out", "target"], "loss"), [out, target], None
    )
    torch.testing.assert_close(loss, F.cross_entropy(out, target))
    assert all(torch.isfinite(t).all() for t in manual.values())


NORM_LOSS = list(itertools.product(["none", "layernorm", "batchnorm"], ["mse", "cross_entropy"]))
CONFIGS = [
    dict(norm=norm, loss=loss, batch=batch, hidden=hidden, dtype=dtype, activation=act)
    for (norm, loss), batch, hidden, dtype, act in itertools.islice(
        zip(
            itertools.cycle(NORM_LOSS),
            itertools.cycle(LEADS),
            itertools.cycle([[], [6], [5, 4], [4, 4, 3]]),
            itertools.cycle(DTYPES),
            itertools.cycle(["relu", "tanh", "leaky_relu", "sigmoid", "relu"]),
        ),
        24,
    )
]


@pytest.mark.parametrize("fields", CONFIGS, ids=lambda f: "-".join(str(v) for v in f.values()))
def test_networks_match_autograd(fields):
    cfg = RunRequest(in_features=5, out_features=3, init="kaiming", **fields)
    tensors = make_tensors(cfg)
    net = Network.from_config(cfg)
    grads = net.backward(net.forward(tensors), Context())
    check = autograd_check(cfg, tensors, grads)
    failing = {
        n: c for n, c in {**check["tensors"], **check["intermediates"]}.items() if not c["allclose"]
    }
    assert check["all_close"], failing
    names = {"x", *(f"{p}{k}" for k in range(1, len(cfg.hidden) + 2) for p in "wb")}
    if cfg.norm != "none":
        names |= {f"{p}{k}" for k in range(1, len(cfg.hidden) + 1) for p in ("gamma", "beta")}
    assert set(check["tensors"]) == names
    assert "out" in check["intermediates"]
    assert ("out:fused" in check["intermediates"]) == (cfg.loss == "cross_entropy")


def test_the_check_catches_a_wrong_norm_gradient(monkeypatch):
    """A norm backward that drops the variance term fails the check: it can fail."""
    from app.ops.norms import LayerNorm

    cfg = RunRequest(batch=6, in_features=5, hidden=[4], out_features=2, norm="layernorm")
    tensors = make_tensors(cfg)
    net = Network.from_config(cfg)
    env = net.forward(tensors)
    real = LayerNorm.backward

    def wrong(self, g, l, gamma, beta, *, result):  # noqa: E741
        formulas = real(self, g, l, gamma, beta, result=result)
        formulas[l.expr] = lambda: g * gamma * self._normalize(l)["rstd"]  # no mean/var terms
        return formulas

    monkeypatch.setattr(LayerNorm, "backward", wrong)
    check = autograd_check(cfg, tensors, net.backward(env, Context()))
    assert not check["all_close"]
    assert not check["tensors"]["x"]["allclose"]
    assert check["tensors"]["gamma1"]["allclose"]


class _G(torch.Tensor):
    """A tensor that also holds `.g`, as the article's tensors do (`out.g = ...`)."""


def _namespace(env: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> dict:
    ns: dict = {"torch": torch, "F": F}
    for name, t in env.items():
        ns[name] = t.as_subclass(_G)
        if name in grads:
            ns[name].g = grads[name]
    return ns


@pytest.mark.parametrize(
    "fields",
    [
        dict(loss="cross_entropy", batch=[4, 3], hidden=[5]),
        dict(norm="layernorm", batch=5, hidden=[4, 3], activation="tanh"),
        dict(norm="batchnorm", batch=[2, 3], hidden=[4], loss="cross_entropy", dtype="float64"),
        dict(norm="batchnorm", batch=7, hidden=[3, 3], activation="leaky_relu"),
    ],
)
def test_code_strings_run_as_python_give_the_manual_gradients(fields):
    """Each forward/backward `code` (multi-line: named steps, then the result), executed on
    the run's real tensors, gives the op's output / the manual gradient, and every traced
    shape is the real one: the text shown is the computation done."""
    cfg = RunRequest(in_features=6, out_features=3, **fields)
    forward, backward = pipeline.trace(cfg)
    tensors = make_tensors(cfg)
    net = Network.from_config(cfg)
    env = net.forward(tensors)
    grads = net.backward(env, Context())
    tol = TOL[DTYPES[cfg.dtype]]
    for entry in forward:
        ns = _namespace(env, {})
        exec(entry["code"], ns)  # noqa: S102
        torch.testing.assert_close(
            torch.as_tensor(ns[entry["output"]]), env[entry["output"]], **tol
        )
        assert list(env[entry["output"]].shape) == entry["shape"]
    seen_variant = False
    for entry in backward:
        ns = _namespace(env, grads)
        exec(entry["code"], ns)  # noqa: S102
        key = entry["grad"] + (f":{entry['variant']}" if entry.get("variant") else "")
        seen_variant |= "variant" in entry
        result = ns[entry["grad"]].g
        torch.testing.assert_close(result, grads[key], **tol)
        assert list(result.shape) == entry["shape"] == list(env[entry["grad"]].shape)
        *_, last = entry["code"].splitlines()
        assert last.split(" = ", 1)[1] == entry["steps"][-1]["expr"]
        for step in entry["steps"]:  # each step's expression, evaluated, has its traced shape
            if step.get("name"):
                continue  # named steps are checked through the lines that define them
            value = eval(step["expr"], ns)  # noqa: S307
            assert list(value.shape) == step["output"], step["expr"]
    assert seen_variant == (cfg.loss == "cross_entropy")


def test_cross_entropy_trace_reads_step_by_step():
    cfg = RunRequest(batch=[4, 3], in_features=6, hidden=[5], out_features=3, loss="cross_entropy")
    forward, backward = pipeline.trace(cfg)
    assert forward[-1]["code"].splitlines() == [
        "m = out.max(-1, keepdim=True).values",
        "shifted = out - m",
        "counts = shifted.exp()",
        "counts_sum = counts.sum(-1, keepdim=True)",
        "logprobs = shifted - counts_sum.log()",
        "loss = -logprobs.gather(-1, target.unsqueeze(-1)).mean()",
    ]
    step_by_step, fused = backward[0], backward[1]
    assert (step_by_step["grad"], fused["grad"], fused["variant"]) == ("out", "out", "fused")
    assert "variant" not in step_by_step
    assert fused["code"].splitlines()[-2:] == [
        "probs = counts / counts_sum",
        "out.g = (probs - F.one_hot(target, 3).to(torch.float32)) / 12",
    ]
    named = {s["name"]: s for s in step_by_step["steps"] if "name" in s}
    assert set(named) >= {
        "m",
        "shifted",
        "counts",
        "counts_sum",
        "logprobs.g",
        "counts_sum.g",
        "shifted.g",
        "m.g",
    }
    assert named["m"]["output"] == [4, 3, 1] and named["shifted"]["action"] == "broadcast"
    # the broadcast of counts_sum.log() over the classes is undone by a reduce over the last dim
    assert named["counts_sum.g"]["inputs"] == [[4, 3, 1], [4, 3, 1]]
    reduces = [s for s in step_by_step["steps"] if s["action"] == "reduce"]
    assert any(s["reduced_dims"] == [2] and s["output"] == [4, 3, 1] for s in reduces)
    order = [s["name"] for s in step_by_step["steps"] if "name" in s]  # execution order
    assert order.index("counts_sum") < order.index("logprobs.g") < order.index("m.g")


def test_norm_parameters_reduce_through_unbroadcast():
    """gamma.g and beta.g sum over every leading dim, as one traced reduce each."""
    cfg = RunRequest(batch=[4, 3], in_features=6, hidden=[5], norm="batchnorm")
    _, backward = pipeline.trace(cfg)
    by_grad = {e["grad"]: e for e in backward}
    assert by_grad["beta1"]["code"] == "beta1.g = n1.g.sum((0, 1))"
    assert by_grad["gamma1"]["code"].splitlines()[-1] == "gamma1.g = (n1.g * xhat).sum((0, 1))"
    assert by_grad["gamma1"]["shape"] == [5]
    stats = [s for s in by_grad["l1"]["steps"] if s.get("name") in ("mu", "var", "rstd")]
    assert all(s["output"] == [1, 1, 5] for s in stats)
