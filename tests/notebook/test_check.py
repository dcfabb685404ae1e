"""broadprop.check in a script or a learner's pytest: the namespace's tensors and their .grad,
no kernel. Each case is checked against autograd's own gradients."""

from __future__ import annotations

import pytest
import torch

from broadprop import check


@pytest.fixture
def net() -> dict:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, generator=g)
    W = torch.randn(4, 3, generator=g).requires_grad_()
    b = torch.randn(3, generator=g).requires_grad_()
    out = x @ W + b
    h = torch.tanh(out)
    loss = (h**2).sum()
    for t in [out, h]:
        t.retain_grad()
    loss.backward()
    return {"x": x, "W": W, "b": b, "out": out, "h": h, "loss": loss, "t": h, "n": 5}


RIGHT = """\
dh = 2 * h
dout = (1 - h**2) * dh
dW = x.T @ dout
b.g = dout.sum(0)
"""


def test_a_right_backward_is_all_close(net):
    report = check(RIGHT, net)
    assert report.all_close and report.all_written
    assert report["b"]["spelling"] == "b.g" and report["W"]["exact"] in (True, False)
    assert torch.allclose(report.written["dW"], net["W"].grad)
    assert "t" not in report.check["tensors"]  # the loop's alias of h is not a second tensor
    assert report.answer["backward"][2]["steps"][-1]["output"] == [4, 3]


def test_a_slip_is_flagged_at_its_tensor_with_the_pages_hint(net):
    report = check(RIGHT.replace("(1 - h**2)", "(1 - out**2)"), net)
    assert not report.all_close
    assert report.first_failure == "out"
    assert "1 - h**2, not 1 - out**2" in report["out"]["hint"]
    assert report["W"]["after"] == "out"  # computed from the wrong one


def test_a_line_that_cannot_run_is_the_answers_backward_error(net):
    report = check("dh = 2 * h\ndout = dh @ W\n", net)
    assert report.answer["backward_error"]["line"] == 2
    assert not report.all_close


def test_text_outside_the_language_is_refused_in_one_line_and_nothing_runs(net):
    report = check("import os\n", net)
    assert report.answer is None and report.refused.startswith("line 1 of the backward")
    assert not report.all_close


def test_a_leaf_whose_backward_never_ran_asks_for_loss_backward(net):
    W = net["W"].detach().clone().requires_grad_()
    report = check("dW = x.T @ x[:, :3]\n", {**net, "W": W})
    assert [m.add for m in report.missing_grad] == ["backward"]
    assert report.missing_lines() == [
        "dW: W has no .grad yet: run `loss.backward()` after the forward, then this cell again"
    ]
    assert not report.all_close


def test_a_text_runs_again_over_the_names_it_left_and_a_later_one_reads_them(net):
    """A notebook cell is run twice, and cells build on each other: what a text writes is its
    own even where the kernel already holds the name; earlier gradients stay readable."""
    first = check(RIGHT, net)
    net.update(first.written)
    again = check(RIGHT, net)
    assert again.all_close and again.answer["backward_error"] is None
    net.update(again.written)
    later = check("dout = (1 - out**2) * dh\ndW = x.T @ dout\n", net)  # reads dh, a slip
    assert later.first_failure == "out" and later["W"]["after"] == "out"
    assert {n for n, r in later.check["tensors"].items() if r["written"]} == {"out", "W"}
    assert "dh" not in later.answer["tensors"]  # an earlier gradient is not an input of this text
    # a forward tensor is still the forward's
    refused = check("h = 2 * h\n", net)
    assert "h is the forward's" in refused.answer["backward_error"]["message"]


def test_a_tensor_an_older_forward_left_is_no_tensor_of_this_loss(net):
    """After the forward runs again, the kernel may still hold the old run's tensors under
    other names (an earlier loop's `t`): they are not rows of this loss's check."""
    net["old_h"] = torch.tanh(net["x"] @ net["W"])  # requires grad, not in loss's graph
    net["old_h"].retain_grad()
    (net["old_h"] ** 2).sum().backward()
    net["W"].grad = None
    net["b"].grad = None
    net["loss"] = (torch.tanh(net["x"] @ net["W"] + net["b"]) ** 2).sum()
    net["loss"].backward()
    report = check("dW = x.T @ x[:, :3]\n", net)
    assert "old_h" not in report.check["tensors"]
    assert {"W", "b"} <= set(report.check["tensors"])
