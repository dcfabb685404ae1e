"""The program routes tell the truth (issue 35): a correct line is never suspect because its
float64 recheck could not run, a wrong reduction's message names the tensor and the dim, an
in-place accumulation names its out-of-place form, the deadline message names only settings
the route has, and the exported script says what it needs and what passed."""

from __future__ import annotations

import asyncio
import json
from contextlib import nullcontext

import pytest
from starlette.requests import Request

from app.lab.hints import result_shape
from app.programs import presets
from app.programs import run as programs_run
from app.programs.schemas import ProgramRequest
from app.server.errors import stopped
from app.server.lanes import Stopped
from tests.scripts import run_script

MAKEMORE = presets.preset("makemore")["request"]
LOOP = MAKEMORE["backward"][MAKEMORE["backward"].index("dC = torch.zeros_like(C)") :]
ONE_HOT = "dC = F.one_hot(Xb.view(-1), num_classes=27).float().T @ demb.view(-1, 10)"


def post(client, backward: str, **change):
    response = client.post("/api/program", json={**MAKEMORE, "backward": backward, **change})
    assert response.status_code == 200, response.text
    return response.json()


# `.float()` pins float32 and PyTorch's `@` refuses mixed dtypes: a float64 recheck that kept
# the pin could not run these lines, which in the run's own dtype are right
PINNED = {
    "one-hot matmul, after zeros_like": (
        MAKEMORE["backward"].replace(LOOP, f"dC = torch.zeros_like(C)\n{ONE_HOT}\n"),
        "C",
    ),
    "one-hot matmul alone": (MAKEMORE["backward"].replace(LOOP, f"{ONE_HOT}\n"), "C"),
    # every later line's recheck depends on it (db1 cancels to ~0: judged by its rounding)
    "a pinned matmul mid-way": (
        MAKEMORE["backward"].replace("dW2 = h.T @ dlogits", "dW2 = h.T.float() @ dlogits"),
        "W2",
    ),
    "to(torch.float32) mid-way": (
        MAKEMORE["backward"].replace(
            "dh = dlogits @ W2.T", "dh = dlogits.to(torch.float32) @ W2.T"
        ),
        "h",
    ),
}


def _clean(check: dict) -> dict:
    assert check["first_failure"] is None and check["all_close"] is True, check["first_failure"]
    assert check["suspects"] == []
    assert not any(r["suspect"] for r in check["tensors"].values())
    return check["tensors"]


@pytest.mark.parametrize("name", list(PINNED))
def test_a_line_that_pins_float32_is_rechecked_in_float64_and_never_suspect(client, name):
    backward, pinned = PINNED[name]
    assert backward != MAKEMORE["backward"]
    rows = _clean(post(client, backward)["check"])
    # the recheck reran the line in float64 (`.float()` keeps the recheck's precision)
    assert "recheck" not in rows[pinned] and rows[pinned]["rounding_noise"] > 0


@pytest.mark.parametrize("name", ["one-hot matmul, after zeros_like", "one-hot matmul alone"])
def test_no_correct_line_is_suspect_because_its_float64_recheck_could_not_run(monkeypatch, name):
    # the recheck as it was before: `.float()` pinned, so the float64 rerun stops at the line
    # (run in this process, where the patch holds, whatever process the route runs in)
    monkeypatch.setattr(programs_run, "single_precision_as", lambda dtype: nullcontext())
    backward, pinned = PINNED[name]
    req = ProgramRequest.model_validate({**MAKEMORE, "backward": backward})
    plan = programs_run.admit(req, 2**31, 30.0)
    assert plan.rerun
    rows = _clean(programs_run.run(req, plan)["check"])
    # the recheck that could not run is said, not counted as a 100% error
    assert "could not run" in rows[pinned]["recheck"]
    assert "expected m1 and m2 to have the same dtype" in rows[pinned]["recheck"]
    assert "float64_rel_err" not in rows[pinned]


def test_a_recheck_that_runs_still_finds_a_real_suspect(client):
    # a dropped eps hides inside float32's tolerance; the pinned-dtype rule must not silence
    # a float64 recheck that ran
    old = "(bnvar + 1e-5)"
    assert old in MAKEMORE["backward"]
    check = post(client, MAKEMORE["backward"].replace(old, "bnvar", 1))["check"]
    assert "bnvar" in check["suspects"]
    assert "recheck" not in check["tensors"]["bnvar"]


def test_every_preset_has_no_suspect_and_no_skipped_recheck(client):
    for p in presets.PRESETS:
        response = client.post("/api/program", json=p["request"])
        assert response.status_code == 200, (p["id"], response.text)
        check = response.json()["check"]
        assert check["suspects"] == [], p["id"]
        assert not [n for n, r in check["tensors"].items() if r.get("recheck")], p["id"]


def test_a_sum_over_the_wrong_dim_names_the_tensor_and_the_batch_dim(client):
    check = post(
        client, MAKEMORE["backward"].replace("db1 = dhprebn.sum(0)", "db1 = dhprebn.sum(1)")
    )["check"]
    hint = check["tensors"]["b1"]["hint"]
    assert hint.startswith("db1 must have b1's shape (64,), but the formula gives (32,)")
    assert "d's shape" not in hint
    assert "`.sum(0)`" in hint and "batch" in hint


def test_the_lab_keeps_naming_x_g_by_its_tensor():
    assert result_shape("x.g", (3,), (4,), []).startswith("x.g must have x's shape (4,)")


def test_index_add_in_place_and_out_of_place_both_run_and_match(client):
    """v4: `dC.index_add_(...)` writes the program's own fresh tensor in place, as PyTorch."""
    backward = MAKEMORE["backward"].replace(
        LOOP, "dC = torch.zeros_like(C)\ndC.index_add_(0, Xb.view(-1), demb.view(-1, 10))\n"
    )
    assert post(client, backward)["check"]["tensors"]["C"]["allclose"] is True
    fixed = backward.replace(
        "dC.index_add_(0, Xb.view(-1), demb.view(-1, 10))",
        "dC = dC.index_add(0, Xb.view(-1), demb.view(-1, 10))",
    )
    assert post(client, fixed)["check"]["tensors"]["C"]["allclose"] is True


def _deadline_message(path: str) -> str:
    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}
    response = asyncio.run(stopped(Request(scope), Stopped("deadline", 3.0)))
    assert response.status_code == 422
    return json.loads(response.body)["detail"][0]["msg"]


def test_the_deadline_message_names_only_settings_the_route_has():
    for path in ("/api/program", "/api/program/train"):
        msg = _deadline_message(path)
        assert "still going after 3 s" in msg
        assert "compare" not in msg and "fd_samples" not in msg and "batch or the widths" not in msg
        assert "inputs" in msg
    assert "fd_samples" in _deadline_message("/api/run")


def test_the_exported_script_says_what_it_needs_and_prints_on_success(client):
    response = client.post("/api/export", json={"program": MAKEMORE, "format": "py"})
    assert response.status_code == 200
    text = response.text
    assert "pip install torch names" in text
    assert "match autograd" in text and "else:" in text


def test_export_takes_a_program_as_large_as_the_program_route_and_says_413_in_its_schema(client):
    assert "413" in client.get("/openapi.json").json()["paths"]["/api/export"]["post"]["responses"]
    # ~200 KiB of value input: over the 64 KiB default, within the program routes' 1 MiB
    values = [[0.5] * 100 for _ in range(400)]
    program = {
        "inputs": {"x": {"value": values}, "W": {"shape": [100, 3]}},
        "forward": "h = x @ W\nloss = h.sum()",
        "backward": "dh = torch.ones_like(h)\ndW = x.T @ dh",
    }
    body = {"program": program, "format": "py"}
    assert len(json.dumps(body)) > 1 << 16
    assert client.post("/api/program", json=program).status_code == 200
    assert client.post("/api/export", json=body).status_code == 200
    huge = {**body, "program": {**program, "inputs": {"x": {"value": [[0.5] * 1000] * 300}}}}
    assert client.post("/api/export", json=huge).status_code == 413


def test_the_api_page_names_the_program_routes_and_their_body_limit():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "API.md").read_text()
    for route in (
        "POST /api/program`",
        "GET /api/programs`",
        "POST /api/program/train`",
        "GET /program`",
    ):
        assert route in text, route
    assert "1 MiB" in text and "check.all_close" in text


def test_the_exported_script_says_the_first_failure_and_its_hint_in_the_pages_order(
    client, tmp_path
):
    """35.9: the file listed failures in another order, with no first failure and no hint."""

    slip = MAKEMORE["backward"].replace(
        "dhpreact = (1.0 - h ** 2) * dh", "dhpreact = (1.0 - hpreact ** 2) * dh"
    )
    assert slip != MAKEMORE["backward"]
    page = post(client, slip)["check"]
    first = page["first_failure"]
    assert first == "hpreact"
    hint = page["tensors"][first]["hint"]
    assert hint and "1 - h**2, not 1 - hpreact**2" in hint
    response = client.post("/api/export", json={"program": {**MAKEMORE, "backward": slip},
                                                "format": "py"})  # fmt: skip
    assert response.status_code == 200, response.text[:300]
    path = tmp_path / "broadprop_program.py"
    path.write_text(response.text)
    done = run_script([path], timeout=300)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout.splitlines()
    # every written gradient, in the page's order (by the line that finishes it)
    rows = [line.split()[0] for line in out if " exact: " in line]
    assert rows == [n for n, r in page["tensors"].items() if r["written"]]
    # the first failure marked on its row, and said at the end with the page's hint
    (marked,) = [line for line in out if "<- first failure" in line]
    line = page["tensors"][first]["lines"]
    assert marked.startswith("hpreact ") and f"(line {line[0]})" in marked
    later = [n for n, r in page["tensors"].items() if r.get("after") == first]
    assert later and all(
        any(o.startswith(n + " ") and "<- uses dhpreact" in o for o in out) for n in later
    )
    end = out.index(next(o for o in out if o.startswith("first failure: dhpreact")))
    assert f"backward line {line[0]}" in out[end] and "fix it first" in out[end]
    assert hint in out[end + 1]
