"""A program's gradient maps drawn before its check (app/programs/check.py `own_views`, made
while the float64 rerun is on its way from another worker) are the maps drawn after it."""

from __future__ import annotations

import pytest
import torch

from app.ops.precision import single_precision_as
from app.programs import presets
from app.programs import run as programs_run
from app.programs.check import own_views
from app.programs.schemas import ProgramRequest

MAKEMORE = presets.preset("makemore")["request"]
CASES = {
    "makemore": MAKEMORE,
    # (32, 64)'s bias gradient written without keepdim: the same entries, another shape
    "a shape note": {
        **MAKEMORE,
        "backward": MAKEMORE["backward"].replace(
            "db1 = dhprebn.sum(0)", "db1 = dhprebn.sum(0).view(1, -1)"
        ),
    },  # fmt: skip
    # a gradient of the wrong shape and one that is not float
    "wrong shapes": {
        **MAKEMORE,
        "backward": MAKEMORE["backward"]
        .replace("dW2 = h.T @ dlogits", "dW2 = (h.T @ dlogits).T")
        .replace(
            "dbnbias = dhpreact.sum(0, keepdim=True)",
            "dbnbias = dhpreact.sum(0, keepdim=True).long()",
        ),
    },  # fmt: skip
}


def _answer(body: dict, early: bool) -> dict:
    req = ProgramRequest.model_validate(body)
    plan = programs_run.admit(req, 2**31, 30.0)
    made = programs_run.made_inputs(req)
    main = programs_run.execute_once(req, plan, torch.float32, lambda: None, made)
    drawn = own_views(req, plan, main) if early else None
    with single_precision_as(torch.float64):
        rerun = programs_run.execute_once(req, plan, torch.float64, lambda: None, made)
    answer = programs_run.answer(req, plan, main, rerun, 1.0, drawn=drawn)
    return {k: v for k, v in answer.items() if k != "timing"}


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "tolist"):  # numpy maps
        return a.tolist() == b.tolist()
    return a == b or (a != a and b != b)


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_maps_drawn_before_the_check_are_the_maps_drawn_after_it(name, reference):
    body = {**CASES[name], "reference_heatmaps": reference}
    assert body["backward"] != MAKEMORE["backward"] or name == "makemore"
    early, late = _answer(body, True), _answer(body, False)
    assert _same(early, late)
    views = early["gradients"]
    assert views["W1"]["source"] == "manual"
    assert ("tolerance_heatmap" in views["W1"]) is reference


def test_the_cases_hold_what_they_name():
    rows = _answer({**CASES["a shape note"]}, True)["check"]["tensors"]
    assert "shape_note" in rows["b1"] and rows["b1"]["allclose"]
    rows = _answer({**CASES["wrong shapes"]}, True)["check"]["tensors"]
    assert rows["W2"]["shape_ok"] is False and rows["bnbias"]["allclose"] is False
