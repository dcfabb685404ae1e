"""torch.autograd.gradcheck (float64) on every op's manual backward wrapped as an
autograd.Function: the manual formulas against numerical Jacobians, op by op."""

from __future__ import annotations

import pytest
import torch

from app.ops import Context, Op, Traced


def manual_function(op: Op):
    """An autograd.Function whose forward is `op.forward` and backward `op.compute_backward`."""

    class Manual(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *xs):
            out = op.forward(*(Traced.leaf(x, n) for x, n in zip(xs, op.inputs))).t
            ctx.save_for_backward(*xs, out)
            return out

        @staticmethod
        def backward(ctx, g):
            *xs, out = ctx.saved_tensors
            is_loss = out.ndim == 0 and op.no_grad_inputs  # a loss starts the chain: g = 1
            grads = op.compute_backward(None if is_loss else g, xs, out, Context())
            scale = g if is_loss else 1
            return tuple(
                grads[n] * scale if i not in op.no_grad_inputs else None
                for i, n in enumerate(op.inputs)
            )

    return Manual.apply


def _rand(*shape, seed=0, **kw):
    return torch.randn(
        *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed), **kw
    )


LEADS = [(5,), (4, 3)]


@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("kind", ["relu", "leaky_relu", "tanh", "sigmoid"])
def test_activation_gradcheck(kind, lead):
    z = _rand(*lead, 6, seed=1)
    z = torch.where(z.abs() < 0.05, z + 0.2, z).requires_grad_()  # no entry within reach of a kink
    assert torch.autograd.gradcheck(manual_function(Op.registry[kind](["l"], "a")), (z,))


@pytest.mark.parametrize("lead", LEADS)
def test_linear_gradcheck(lead):
    op = Op.registry["linear"](["x", "w", "b"], "l")
    args = (_rand(*lead, 5, seed=1), _rand(5, 3, seed=2), _rand(3, seed=3))
    assert torch.autograd.gradcheck(manual_function(op), [a.requires_grad_() for a in args])


@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("kind", ["layernorm", "batchnorm"])
def test_norm_gradcheck(kind, lead):
    op = Op.registry[kind](["l", "gamma", "beta"], "n")
    args = (_rand(*lead, 4, seed=1) * 2, 1 + 0.1 * _rand(4, seed=2), 0.1 * _rand(4, seed=3))
    assert torch.autograd.gradcheck(manual_function(op), [a.requires_grad_() for a in args])


@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("out_features", [1, 3])
def test_mse_gradcheck(lead, out_features):
    op = Op.registry["mse"](["out", "target"], "loss")
    out = _rand(*lead, out_features, seed=1).requires_grad_()
    target = _rand(*lead, seed=2) if out_features == 1 else _rand(*lead, out_features, seed=2)
    assert torch.autograd.gradcheck(manual_function(op), (out, target))


@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("classes", [1, 4])
def test_cross_entropy_gradcheck(lead, classes):
    op = Op.registry["cross_entropy"](["out", "target"], "loss")
    out = (3 * _rand(*lead, classes, seed=1)).requires_grad_()
    target = torch.randint(classes, lead, generator=torch.Generator().manual_seed(2))
    assert torch.autograd.gradcheck(manual_function(op), (out, target))


def test_gradcheck_catches_a_wrong_backward():
    """The harness can fail: a tanh whose backward forgets the square is refused."""

    class WrongTanh(Op):
        def forward(self, l):  # noqa: E741
            return l.tanh()

        def backward(self, g, l, *, result):  # noqa: E741
            return {l.expr: lambda: (1 - result) * g}

    z = _rand(5, 3, seed=1).requires_grad_()
    fn = manual_function(WrongTanh(["l"], "a"))
    assert not torch.autograd.gradcheck(fn, (z,), raise_exception=False)
