"""%%forward without a kernel (app/notebook/forward.py): the forward cell run through
Broadprop's interpreter over a namespace, then the backward checked against what it left.
Every gradient is autograd's; the forward's loss is the preset's program's."""

from __future__ import annotations

import pytest
import torch

from app.notebook.forward import ForwardFailed, run_forward
from app.notebook.magics import MIME, forward_bundle
from app.programs.inputs import make_inputs
from app.programs.presets import preset
from app.programs.schemas import ProgramRequest
from broadprop import check
from tests.notebook.test_presets import preset_run


def _namespace(req: ProgramRequest) -> dict:
    """The preset's inputs as a learner's setup cell leaves them: parameters require grad."""
    ns = make_inputs(req.inputs, req.seed, req.dtype)
    for name, spec in req.inputs.items():
        if spec.wants_grad:
            ns[name].requires_grad_()
    return ns


@pytest.fixture(scope="module")
def makemore() -> tuple[ProgramRequest, dict, object]:
    req = ProgramRequest(**preset("makemore")["request"])
    ns = _namespace(req)
    return req, ns, run_forward(req.forward, ns)


def test_the_forward_keeps_every_gradient_without_retain_grad(makemore):
    req, ns, fwd = makemore
    assert fwd.loss == pytest.approx(preset_run("makemore")["loss"], rel=1e-6)
    assert set(fwd.grad_inputs) == {"C", "W1", "b1", "W2", "b2", "bngain", "bnbias"}
    for name in fwd.assigned:  # the names stay in the kernel, each holding its gradient
        assert isinstance(ns[name], torch.Tensor)
        assert ns[name].retains_grad == (name != "loss"), name
        assert name == "loss" or ns[name].grad is not None, name
    assert ns["loss"].item() == pytest.approx(fwd.loss)


def test_the_backward_after_it_is_checked_and_draws_the_forwards_flow(makemore):
    req, ns, fwd = makemore
    report = check(req.backward, ns, forward=fwd)
    assert report.all_close and report.all_written and len(report.check["tensors"]) == 26
    flow = report.answer["forward"]
    assert [line["target"] for line in flow][:3] == ["emb", "embcat", "hprebn"]
    assert set(flow[2]["reads"]) == {"embcat", "W1", "b1"}
    assert flow[2]["steps"][-1]["broadcast"]["b"]["grad_sum_dims"] == [0]  # b1 is stretched
    # the forward's text is read for the hints: tanh's derivative from its input
    slip = check(req.backward.replace("(1.0 - h ** 2)", "(1.0 - hpreact ** 2)"), ns, forward=fwd)
    assert slip.first_failure == "hpreact"
    assert "1 - h**2, not 1 - hpreact**2" in slip["hpreact"]["hint"]


def test_the_forwards_bundle_is_its_lines_and_shapes(makemore):
    _, ns, fwd = makemore
    data = forward_bundle(fwd, ns, widget=False)
    assert data[MIME]["check"] is None and len(data[MIME]["forward"]) == 20
    assert data[MIME]["tensors"]["W1"]["role"] == "param"
    assert data[MIME]["tensors"]["logits"]["role"] == "intermediate"
    assert "hprebn = embcat @ W1 + b1" in data["text/html"] and "(32, 64)" in data["text/html"]
    assert data["text/plain"].startswith("Broadprop forward: loss 3.3")


def test_a_forward_run_again_clears_the_old_gradients():
    req = ProgramRequest(**preset("article")["request"])
    ns = _namespace(req)
    first = run_forward(req.forward, ns)
    w1 = ns["w1"].grad.clone()
    again = run_forward(req.forward, ns)  # its names are its own now: l1, a1, out, loss
    assert again.loss == first.loss
    assert torch.equal(ns["w1"].grad, w1)  # not twice w1's gradient
    assert check(req.backward, ns, forward=again).all_close


def test_without_requires_grad_every_float_input_gets_one_or_those_named():
    g = torch.Generator().manual_seed(0)
    ns = {"x": torch.randn(4, 3, generator=g), "w": torch.randn(3, 2, generator=g),
          "target": torch.randn(4, 2, generator=g)}  # fmt: skip
    text = "out = x @ w\nloss = ((out - target) ** 2).mean()\n"
    assert run_forward(text, ns).grad_inputs == ["x", "w", "target"]
    assert run_forward(text, ns, grad=["w"]).grad_inputs == ["w"]
    report = check("dout = 2 * (out - target) / out.numel()\ndw = x.T @ dout\n", ns)
    assert report.all_close and report["w"]["written"]
    with pytest.raises(ForwardFailed, match="--grad y: not a float tensor"):
        run_forward(text, ns, grad=["y"])


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("import os\n", "line 1 of the forward"),
        ("out = x @ w\n", "never assigns loss"),
        ("out = x @ x\nloss = out.sum()\n", "line 1 of the forward"),  # (4, 3) @ (4, 3)
        ("loss = x @ w\n", "scalar float tensor"),
    ],
)
def test_a_forward_that_cannot_run_says_so_in_one_line(text, says):
    ns = {"x": torch.randn(4, 3), "w": torch.randn(3, 2).requires_grad_()}
    with pytest.raises(ForwardFailed, match=says) as err:
        run_forward(text, ns)
    assert "\n" not in str(err.value).split(": ", 1)[0]
