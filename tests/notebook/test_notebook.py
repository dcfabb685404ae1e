"""%%backward in a real kernel (issue 33): a small notebook, its forward in plain PyTorch with
retain_grad() and loss.backward(), run headless by nbclient; every output's bundle and the
check it carries, as POST /api/program would answer it. One kernel for the module (~5 s)."""

from __future__ import annotations

import os
import subprocess
import sys

import nbformat
import pytest

from tests.notebook.kernel import MIME, ROOT, WIDGET, displays, execute, notebook

SETUP = """\
import torch
import torch.nn.functional as F
%load_ext broadprop
g = torch.Generator().manual_seed(42)
n = 8
x = torch.randn(n, 5, generator=g)
W1 = (torch.randn(5, 6, generator=g) * 0.5).requires_grad_()
b1 = (torch.randn(6, generator=g) * 0.1).requires_grad_()
W2 = (torch.randn(6, 3, generator=g) * 0.5).requires_grad_()
y = torch.randint(0, 3, (n,), generator=g)
"""

FORWARD = """\
hpre = x @ W1 + b1
h = torch.tanh(hpre)
logits = h @ W2
loss = F.cross_entropy(logits, y)
for t in [hpre, h, logits]:
    t.retain_grad()
loss.backward()
"""

RIGHT_AND_WRONG = """\
%%backward
dlogits = F.softmax(logits, 1)
dlogits[range(n), y] -= 1
dlogits /= n
dW2 = h.T @ dlogits
dh = dlogits @ W2.T
dhpre = (1 - hpre**2) * dh
cmp('hpre', dhpre, hpre)
"""

KEPT = "print(tuple(dW2.shape), tuple(dhpre.shape), torch.allclose(dW2, W2.grad))"

# a second forward whose intermediates retain nothing: their .grad is None
NO_RETAIN = """\
hpre2 = x @ W1 + b1
loss2 = torch.tanh(hpre2).sum()
W1.grad = None
loss2.backward()
"""

MISSING = """\
%%backward --loss loss2
dhpre2 = 1 - torch.tanh(hpre2)**2
dW1 = x.T @ dhpre2
"""


@pytest.fixture(scope="module")
def ran() -> nbformat.NotebookNode:
    return execute(notebook(SETUP, FORWARD, RIGHT_AND_WRONG, KEPT, NO_RETAIN, MISSING), 60)


def test_the_cell_gives_one_bundle_with_the_widget_the_page_the_summary_and_the_check(ran):
    (data,) = displays(ran.cells[2])
    assert set(data) == {WIDGET, "text/html", "text/plain", MIME}
    assert data[WIDGET]["model_id"]
    assert "<table" in data["text/html"] and "<svg" in data["text/html"]
    assert "First wrong gradient: dhpre" in data["text/plain"]
    assert not [o for o in ran.cells[2].outputs if o["output_type"] == "error"]


def test_the_check_is_post_api_programs_answer_with_a_verdict_per_tensor(ran):
    (data,) = displays(ran.cells[2])
    answer = data[MIME]
    assert set(answer) >= {"loss", "tensors", "forward", "backward", "check", "gradients",
                           "backward_error", "timing"}  # fmt: skip
    rows = answer["check"]["tensors"]
    assert {n for n, r in rows.items() if r["written"]} == {"logits", "W2", "h", "hpre"}
    assert rows["logits"]["allclose"] and rows["W2"]["allclose"] and rows["h"]["allclose"]
    assert rows["logits"]["spelling"] == "dlogits" and rows["logits"]["lines"] == [1, 2, 3]
    # the slip: tanh's derivative from its input, not its output, named as on the page (the
    # forward's tanh read from autograd's graph)
    assert not rows["hpre"]["allclose"]
    assert answer["check"]["first_failure"] == "hpre"
    assert "1 - h**2, not 1 - hpre**2" in rows["hpre"]["hint"]
    assert "1 - h**2, not 1 - hpre**2" in data["text/plain"]
    assert not answer["check"]["all_close"]
    # W1 and b1 have a .grad and are not written; `t` (the retain_grad loop's last) is hpre's alias
    assert not rows["W1"]["written"] and not rows["b1"]["written"]
    assert "t" not in rows
    assert answer["loss"] == pytest.approx(answer["loss"])  # a number, not NaN
    assert [line["target"] for line in answer["backward"]][:2] == ["dlogits", "dlogits"]
    assert answer["backward"][3]["steps"][-1]["output"] == [6, 3]  # dW2's shape trace


def test_the_names_the_cell_writes_stay_in_the_kernel(ran):
    out = "".join(o.get("text", "") for o in ran.cells[3].outputs)
    assert out.strip() == "(6, 3) (8, 6) True"


def test_a_gradient_of_a_tensor_with_no_grad_gets_one_line_saying_what_to_add(ran):
    cell = ran.cells[5]
    assert not [o for o in cell.outputs if o["output_type"] == "error"]  # never a traceback
    (data,) = displays(cell)
    plain = data["text/plain"]
    assert "dhpre2: hpre2 has no .grad to check against: add `hpre2.retain_grad()`" in plain
    assert "before `loss2.backward()`" in plain
    assert len([ln for ln in plain.splitlines() if "no .grad" in ln]) == 1
    answer = data[MIME]
    assert answer["missing_grad"][0]["tensor"] == "hpre2"
    assert answer["missing_grad"][0]["add"] == "retain_grad"
    assert answer["check"]["tensors"]["W1"]["allclose"]  # the rest is still checked
    assert "hpre2 has no .grad" in data["text/html"]


def test_importing_the_extension_loads_no_web_framework():
    code = (
        "import sys, broadprop, app.notebook.magics, app.notebook.widget\n"
        "web = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('fastapi', 'starlette', 'uvicorn', 'anyio'))\n"
        "print(web)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    assert out.stdout.strip() == "[]", out.stdout
