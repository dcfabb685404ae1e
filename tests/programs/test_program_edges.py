"""Edges a fuzz found: a negative torch.arange, tensors with no entries, a pair as a result.
Each is a 4xx naming where it is, or a run that answers; never a 500."""

from __future__ import annotations

import copy

import pytest

# a 500 must fail an assertion, not the request
pytestmark = pytest.mark.app_settings(raise_server_exceptions=False)


@pytest.fixture(scope="module")
def article(client):
    return next(p for p in client.get("/api/programs").json() if p["id"] == "article")["request"]


LOSS = "loss = (out.squeeze(-1) - target).pow(2).mean()"


def with_forward(article, line: str, backward: str = "") -> dict:
    req = copy.deepcopy(article)
    req["forward"] = req["forward"].replace(LOSS, line)
    if backward:
        req["backward"] = backward + "\n" + req["backward"]
    return req


def test_a_negative_arange_is_refused_at_its_line(client, article):
    r = client.post("/api/program", json=with_forward(article, "zz = x[torch.arange(-1)]\n" + LOSS))
    assert r.status_code == 422, r.text[:300]
    (detail,) = r.json()["detail"]
    assert detail["loc"] == ["body", "forward", 4] and "n >= 0" in detail["msg"]


def test_a_negative_arange_in_a_formula_is_refused_at_its_key(client):
    formula = "l1.g.sum(0) + 0 * torch.arange(-3).sum()"
    body = {"batch": 4, "in_features": 3, "hidden": [2], "formulas": {"b1.g": formula}}
    r = client.post("/api/run", json=body)
    assert r.status_code == 422, r.text[:300]
    assert r.json()["detail"][0]["loc"] == ["body", "formulas", "b1.g"]


def test_an_input_with_no_entries_is_refused_at_its_shape(client, article):
    req = copy.deepcopy(article)
    req["inputs"]["x"]["shape"] = [0, 784]
    r = client.post("/api/program", json=req)
    assert r.status_code == 422, r.text[:300]
    assert ["body", "inputs", "x", "shape", 0] in [d["loc"] for d in r.json()["detail"]]


@pytest.mark.parametrize(
    "line, backward",
    [
        ("zz = b2[range(0)]\n" + LOSS, ""),
        ("zz = (b2 * 1.0).expand(0)\n" + LOSS, ""),
        ("zz = b2[range(0)]\n" + LOSS.replace(".mean()", ".mean() + zz.sum()"),
         "zz.g = torch.ones_like(zz)"),
    ],
)  # fmt: skip
def test_an_intermediate_with_no_entries_runs_and_is_checked(client, article, line, backward):
    r = client.post("/api/program", json=with_forward(article, line, backward))
    assert r.status_code == 200, r.text[:300]
    assert r.json()["tensors"]["zz"]["shape"] == [0]


def test_a_pair_as_a_result_is_named_in_the_learners_words(client):
    body = {
        "batch": 4, "in_features": 3, "hidden": [2], "loss": "cross_entropy", "out_features": 3,
        "formulas": {"out.g": "m = out.max(dim=-1)\nm"},
    }  # fmt: skip
    r = client.post("/api/run", json=body)
    assert r.status_code == 422, r.text[:300]
    msg = r.json()["detail"][0]["msg"]
    assert "pair (values, indices)" in msg and "Traced" not in msg and "0x" not in msg


def test_var_over_a_stretched_tensor_is_costed_as_two_passes(client):
    """A var reads its input twice; costed as a sum, a stretched (20000, 20000) var passed
    the estimate and held the server for seconds past it."""
    formula = (
        "s = x.sum().reshape(1, 1)\ne = s.expand(20000, 20000)\n"
        "e.t().var(0)[0:3].reshape(1, 3) * 0 + l1.g @ w1.T + 1"
    )
    body = {"batch": 4, "in_features": 3, "hidden": [2], "formulas": {"x.g": formula}}
    r = client.post("/api/run", json=body)
    assert r.status_code == 422, r.text[:300]
    (detail,) = r.json()["detail"]
    assert detail["loc"][:2] == ["body", "formulas"], (
        detail
    )  # the run's work, named at its formulas


def test_an_unknown_name_lists_the_known_inputs_in_the_requests_order(client):
    """The refusal names what is known, inputs first in the order the request gives them (a
    set gave them in hash order: the same program's 422 read differently on each server)."""
    body = {
        "inputs": {"zeta": {"shape": [2, 3]}, "alpha": {"shape": [2, 3]}, "mid": {"shape": [3]}},
        "forward": "h = zeta * alpha\nloss = (h + nothere).sum()",
        "backward": "dh = torch.ones_like(h)",
    }
    r = client.post("/api/program", json=body)
    assert r.status_code == 422, r.text
    assert "(known here: zeta, alpha, mid, h)" in r.json()["detail"][0]["msg"]


@pytest.mark.parametrize("separator", ["\x0c", "\x1c", "\x85", "\u2028"])
def test_a_line_is_named_as_python_numbers_it_whatever_the_separators_in_it(client, separator):
    """Only LF, CRLF and CR end a line, as for Python: a form feed or another separator in a
    comment (pasted from a notebook) must not shift the code the answer shows for later lines."""
    body = {
        "inputs": {"x": {"shape": [2, 3]}},
        "forward": f"a = x * 2  # note{separator}page\nb = a + 1\nloss = b.sum()",
        "backward": "db = torch.ones_like(b)\nda = db\ndx = 2 * da",
    }
    r = client.post("/api/program", json=body)
    assert r.status_code == 200, r.text
    codes = [entry["code"] for entry in r.json()["forward"]]
    assert codes[1:] == ["b = a + 1", "loss = b.sum()"]
    assert r.json()["check"]["all_close"]
