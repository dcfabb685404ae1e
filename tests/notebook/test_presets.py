"""The worked programs as a learner's notebooks (issue 33): makemore part 4's net and the
article's, each forward in plain PyTorch (the preset's inputs made as the contract makes them,
the preset's forward lines, `retain_grad()` on every intermediate, `loss.backward()`), its
backward cell the preset's backward exactly, with `%%backward` on top; run headless by nbclient.

Each notebook is checked against the same program run as POST /api/program runs it (its loss
and verdicts), so the notebook and the page judge one computation. One kernel per notebook."""

from __future__ import annotations

import ast

import nbformat
import pytest
import torch

from app.programs import run as programs
from app.programs.presets import preset
from app.programs.schemas import ProgramRequest
from tests.notebook.kernel import MIME, WIDGET, displays, errors, execute, notebook, printed

# makemore part 4's 26 gradients, as its exercise 1 cmp()s them
MAKEMORE_GRADIENTS = {
    "logprobs", "probs", "counts_sum_inv", "counts_sum", "counts", "norm_logits", "logit_maxes",
    "logits", "h", "W2", "b2", "hpreact", "bngain", "bnbias", "bnraw", "bnvar_inv", "bnvar",
    "bndiff2", "bndiff", "bnmeani", "hprebn", "embcat", "W1", "b1", "emb", "C",
}  # fmt: skip


def setup_cell(req: ProgramRequest) -> str:
    """The inputs as a learner's first cell makes them: the same numbers as the run's inputs
    (app/programs/inputs.py: in the order given, from one seeded generator), the names data
    from the data set the run reads, parameters requiring grad."""
    lines = [
        "import torch",
        "import torch.nn.functional as F",
        "%load_ext broadprop",
        f"g = torch.Generator().manual_seed({req.seed})",
    ]
    params = []
    if any(spec.data is not None for spec in req.inputs.values()):
        lines.append("from app.programs.inputs import names_data  # makemore's contexts")
    for name, spec in req.inputs.items():
        if spec.data is not None:
            part = 0 if spec.field == "X" else 1
            lines.append(f"{name} = names_data({spec.block_size}, {spec.rows}, {req.seed})[{part}]")
        elif spec.value is not None:
            lines.append(f"{name} = {spec.value!r}")
        else:
            shape = tuple(spec.shape)
            lines.append(
                f"{name} = torch.randn({shape}, generator=g) * {spec.scale!r} + {spec.offset!r}"
            )
            if spec.wants_grad:
                params.append(name)
    lines.append(f"parameters = [{', '.join(params)}]")
    lines.append("for p in parameters:\n    p.requires_grad = True")
    return "\n".join(lines)


def forward_cell(req: ProgramRequest) -> str:
    """The preset's forward lines, then makemore's own ending: every intermediate retains its
    gradient, the parameters' are cleared, and the loss runs backward."""
    assigned = [
        t.id
        for stmt in ast.parse(req.forward).body
        if isinstance(stmt, ast.Assign)
        for t in stmt.targets
        if isinstance(t, ast.Name)
    ]
    kept = [n for n in dict.fromkeys(assigned) if n != req.loss]
    return (
        req.forward.rstrip()
        + "\nfor p in parameters:\n    p.grad = None"
        + f"\nfor t in [{', '.join(reversed(kept))}]:\n    t.retain_grad()"
        + f"\n{req.loss}.backward()"
    )


def preset_run(preset_id: str) -> dict:
    """The preset as POST /api/program answers it, run in this process."""
    req = ProgramRequest(**preset(preset_id)["request"])
    return programs.run(req, programs.admit(req, 2**31, 30.0))


def preset_notebook(preset_id: str, *more: str) -> nbformat.NotebookNode:
    req = ProgramRequest(**preset(preset_id)["request"])
    return notebook(setup_cell(req), forward_cell(req), "%%backward\n" + req.backward, *more)


# --------------------------------------------------------------------------- makemore

# a second cell redoes tanh's step from its input, not its output: a makemore classic; it
# reads the first cell's dh, still in the kernel
MAKEMORE_SLIP = """\
%%backward
dhpreact = (1.0 - hpreact ** 2) * dh
dbngain = (bnraw * dhpreact).sum(0, keepdim=True)
dbnbias = dhpreact.sum(0, keepdim=True)
"""

KEPT = "print(torch.allclose(dC, C.grad), torch.allclose(dhpreact, hpreact.grad))"

# the whole exercise again, with makemore's own cmp() lines under it (the notebook defines
# cmp; the check skips those lines, as it covers them)
CMP = "\n".join(f"cmp({n!r}, d{n}, {n})" for n in sorted(MAKEMORE_GRADIENTS))


@pytest.fixture(scope="module")
def makemore() -> nbformat.NotebookNode:
    again = "%%backward\n" + preset("makemore")["request"]["backward"] + CMP
    return execute(preset_notebook("makemore", MAKEMORE_SLIP, KEPT, again))


def test_makemores_backward_cell_checks_all_26_gradients_written_and_all_close(makemore):
    cell = makemore.cells[2]
    assert not errors(cell)
    (data,) = displays(cell)
    check = data[MIME]["check"]
    assert set(check["tensors"]) == MAKEMORE_GRADIENTS
    for name, row in check["tensors"].items():
        assert row["written"] and row["allclose"], (name, row)
    assert check["all_written"] and check["all_close"] and check["first_failure"] is None
    assert data[MIME]["backward_error"] is None
    assert check["tensors"]["C"]["spelling"] == "dC"
    # the embedding's loop ran once per (row, position): 32 x 3
    (loop,) = [
        line for line in data[MIME]["backward"] if line["target"] == "dC" and line["runs"] > 1
    ]
    assert loop["runs"] == 32 * 3


def test_makemores_notebook_is_the_presets_program(makemore):
    """The notebook's numbers are the page's: the same loss, the same 26 verdicts."""
    page = preset_run("makemore")
    (data,) = displays(makemore.cells[2])
    assert data[MIME]["loss"] == pytest.approx(page["loss"], rel=1e-6)
    assert set(page["check"]["tensors"]) == set(data[MIME]["check"]["tensors"])
    assert page["check"]["all_close"]


def test_makemores_bundle_carries_the_widget_view_and_the_html_fallback(makemore):
    (data,) = displays(makemore.cells[2])
    assert set(data) == {WIDGET, "text/html", "text/plain", MIME}
    assert data[WIDGET]["model_id"] and data[WIDGET]["version_major"] == 2
    page = data["text/html"]
    assert "<table" in page and "<svg" in page  # the check table and a gradient's map
    for name in ("dlogprobs", "dbnvar_inv", "dC"):
        assert name in page
    assert "26" in data["text/plain"]
    # the widget's state is the same answer: the kernel holds it in the widget's model
    state = makemore.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json")
    if state is not None:  # nbclient stores widget state when the kernel sent it
        model = state["state"][data[WIDGET]["model_id"]]["state"]
        assert model["answer"]["check"]["all_close"]


def test_a_slip_in_a_second_cell_is_flagged_at_its_tensor(makemore):
    cell = makemore.cells[3]
    assert not errors(cell)
    (data,) = displays(cell)
    check = data[MIME]["check"]
    assert check["first_failure"] == "hpreact"
    rows = check["tensors"]
    assert not rows["hpreact"]["allclose"] and rows["hpreact"]["lines"] == [1]
    assert "1 - h**2" in rows["hpreact"]["hint"]
    # computed from the wrong one: named as such, not as a second slip
    assert rows["bngain"]["after"] == "hpreact" and rows["bnbias"]["after"] == "hpreact"
    # only what this cell writes is written; the rest is autograd's alone
    assert {n for n, r in rows.items() if r["written"]} == {"hpreact", "bngain", "bnbias"}
    assert "First wrong gradient: dhpreact" in data["text/plain"]


def test_the_names_both_cells_wrote_stay_in_the_kernel(makemore):
    assert not errors(makemore.cells[4])
    assert printed(makemore.cells[4]).split() == ["True", "False"]  # dC right, dhpreact the slip


# --------------------------------------------------------------------------- the article


@pytest.fixture(scope="module")
def article() -> nbformat.NotebookNode:
    # w1.g's sums over 1000 rows round apart from autograd's matmul, relative to its largest
    kept = "print(out.g.shape, bool((w1.g - w1.grad).abs().max() < 1e-5 * w1.grad.abs().max()))"
    req = ProgramRequest(**preset("article")["request"])
    # then the forward again through Broadprop: no retain_grad, its trace drawn
    again = ("%%forward\n" + req.forward, "%%backward\n" + req.backward)
    return execute(preset_notebook("article", kept, *again))


def test_the_articles_net_checks_every_g_it_writes(article):
    cell = article.cells[2]
    assert not errors(cell)
    (data,) = displays(cell)
    assert set(data) == {WIDGET, "text/html", "text/plain", MIME}
    check = data[MIME]["check"]
    assert set(check["tensors"]) == {"x", "w1", "b1", "w2", "b2", "l1", "a1", "out"}
    for name, row in check["tensors"].items():
        assert row["written"] and row["allclose"], (name, row)
        assert row["spelling"] == f"{name}.g"
    page = preset_run("article")
    assert data[MIME]["loss"] == pytest.approx(page["loss"], rel=1e-6)
    # a broadcast is traced: w1.g's line multiplies (1000, 784, 1) by (1000, 1, 50)
    (w1g,) = [line for line in data[MIME]["backward"] if line["target"] == "w1.g"]
    assert w1g["steps"][-1]["output"] == [784, 50]


def test_the_articles_g_names_stay_on_the_kernels_tensors(article):
    assert not errors(article.cells[3])
    assert printed(article.cells[3]).strip() == f"{torch.Size([1000, 1])} True"


def test_the_cell_runs_again_with_makemores_cmp_lines_under_it(makemore):
    cell = makemore.cells[5]
    assert not errors(cell)
    (data,) = displays(cell)
    check = data[MIME]["check"]
    assert check["all_close"] and check["all_written"] and len(check["tensors"]) == 26
    assert data[MIME]["backward_error"] is None


def test_forward_runs_the_forward_through_broadprop_and_the_backward_draws_its_flow(article):
    fwd, bwd = article.cells[4], article.cells[5]
    assert not errors(fwd) and not errors(bwd)
    (data,) = displays(fwd)
    assert set(data) == {WIDGET, "text/html", "text/plain", MIME}
    assert data[MIME]["check"] is None
    assert [line["target"] for line in data[MIME]["forward"]] == ["l1", "a1", "out", "loss"]
    assert data[MIME]["forward"][0]["steps"][-1]["output"] == [1000, 50]
    assert "l1 = x @ w1 + b1" in data["text/html"]
    (data,) = displays(bwd)
    answer = data[MIME]
    assert answer["check"]["all_close"] and answer["check"]["all_written"]
    assert [line["target"] for line in answer["forward"]] == ["l1", "a1", "out", "loss"]
    assert set(answer["forward"][0]["reads"]) == {"x", "w1", "b1"}
    assert answer["loss"] == pytest.approx(preset_run("article")["loss"], rel=1e-6)
