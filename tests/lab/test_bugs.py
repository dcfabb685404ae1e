"""GET /api/bugs: every entry of the gallery does what its kind and lesson say, on the
article's default network."""

from __future__ import annotations

import pytest
import torch

from app.check.autograd import autograd_gradients
from app.engine.network import Network
from app.engine.tensors import make_tensors
from app.lab.bugs import BUGS, article_is_same
from app.ops import Context
from app.runs.pipeline import learner_formulas
from app.schemas import RunRequest


@pytest.fixture(scope="module")
def gallery(client):
    response = client.get("/api/bugs")
    assert response.status_code == 200
    return response.json()


def test_the_gallery_has_at_least_ten_of_every_kind(gallery):
    assert len(gallery) >= 10
    assert {b["kind"] for b in gallery} == {"shape", "value", "silent"}
    assert len({b["id"] for b in gallery}) == len(gallery)
    for bug in gallery:
        assert set(bug) == {"id", "title", "grad", "formula", "kind", "lesson"}
        assert bug["lesson"] and bug["title"]


def test_the_articles_three_slips_are_there(gallery):
    ids = {b["id"] for b in gallery}
    assert {"article-b1-never-compared", "article-out-g-never-stored",
            "article-is-same-no-abs"} <= ids  # fmt: skip


def manual_and_autograd(bug) -> tuple[torch.Tensor, torch.Tensor]:
    """The entry's own gradient by its formula, and autograd's, on the article's tensors."""
    cfg = RunRequest(formulas={bug.grad: bug.formula})
    net = Network.from_config(cfg)
    tensors = make_tensors(cfg)
    env = net.forward(tensors)
    grads = net.backward(env, Context(strategy="matmul"), learner_formulas(cfg, net))
    inter: dict[str, torch.Tensor] = {}
    reference = autograd_gradients(cfg, tensors, inter)
    name = bug.grad.removesuffix(".g")
    return grads[name], {**reference, **inter}[name]


@pytest.mark.parametrize("bug", BUGS, ids=[b.id for b in BUGS])
def test_every_entry_does_what_its_kind_says(client, bug):
    response = client.post("/api/run", json={"formulas": {bug.grad: bug.formula}})
    name = bug.grad.removesuffix(".g")
    if bug.kind == "shape":
        assert response.status_code == 422, response.text
        (detail,) = response.json()["detail"]
        assert detail["loc"] == ["body", "formulas", bug.grad]
        assert detail["ctx"]["kind"] in ("shape", "result_shape")
        assert "(" in detail["msg"] and ")" in detail["msg"]  # it names shapes
        return
    assert response.status_code == 200, response.text
    check = response.json()["check"]
    own = check["tensors"].get(name) or check["intermediates"][name]
    assert not own["allclose"]
    assert not check["all_close"]
    manual, truth = manual_and_autograd(bug)
    if bug.kind == "silent":
        assert article_is_same(manual, truth), "a silent bug passes the article's is_same"
    else:  # independently of the server's check: far from autograd
        scale = truth.abs().max()
        assert not torch.allclose(manual, truth, rtol=1e-4, atol=1e-5 * float(scale))


# what the article's own test compares: w1, w2 and b2 (b2 twice; b1 never, x never)
ARTICLE_COMPARES = ("w1", "w2", "b2")


def backward_gradients(formulas: dict[str, str]) -> dict[str, torch.Tensor]:
    """Every gradient of the article's run, the given formulas in place of the built-in ones."""
    cfg = RunRequest(formulas=formulas)
    net = Network.from_config(cfg)
    env = net.forward(make_tensors(cfg))
    return net.backward(env, Context(strategy="broadcast"), learner_formulas(cfg, net))


@pytest.fixture(scope="module")
def correct_run() -> dict[str, torch.Tensor]:
    return backward_gradients({})


RUNNABLE = [b for b in BUGS if b.kind != "shape"]


@pytest.mark.parametrize("bug", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_the_articles_is_same_decides_every_silent_label(correct_run, bug):
    """Silent means the article's is_same, run on every tensor the article compares and on
    the entry's own gradient, against the correct formulas' run, passes it; any other entry
    that runs is caught by it somewhere."""
    wrong = backward_gradients({bug.grad: bug.formula})
    names = (*ARTICLE_COMPARES, bug.grad.removesuffix(".g"))
    verdicts = {n: article_is_same(wrong[n], correct_run[n]) for n in names}
    assert wrong[names[-1]].shape == correct_run[names[-1]].shape
    assert not torch.equal(wrong[names[-1]], correct_run[names[-1]])  # the bug does change it
    if bug.kind == "silent":
        assert all(verdicts.values()), verdicts
    else:
        assert not all(verdicts.values()), f"{bug.id} passes the article's is_same: {verdicts}"


def test_b1_never_compared_passes_everything_the_article_compares(client):
    """The article checks w1, w2, b2 (twice), x: all of them pass; only b1 fails."""
    bug = next(b for b in BUGS if b.id == "article-b1-never-compared")
    check = client.post("/api/run", json={"formulas": {bug.grad: bug.formula}}).json()["check"]
    assert [n for n, c in check["tensors"].items() if not c["allclose"]] == ["b1"]


def test_out_g_never_stored_zeroes_every_gradient_before_it(client):
    bug = next(b for b in BUGS if b.id == "article-out-g-never-stored")
    body = client.post("/api/run", json={"formulas": {bug.grad: bug.formula}}).json()
    for name, view in body["gradients"].items():
        assert view["stats"]["norm"] == 0, name
        assert not body["check"]["tensors"][name]["allclose"], name


def test_is_same_without_abs_is_the_articles_check():
    a = torch.tensor([1.0, 2.0])
    assert article_is_same(a - 5, a)  # 5 too small everywhere: "same"
    assert not article_is_same(a + 5, a)
