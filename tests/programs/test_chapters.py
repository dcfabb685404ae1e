"""The new chapters (issue 31): a GPT block, a conv net and an RNN, each a preset whose worked
backward checks all-close, reads its data set and trains with its own backward; the data they
read (names as sequences, MNIST and the 8x8 digits as images)."""

from __future__ import annotations

import pytest
import torch

from app.programs import presets
from app.programs import train as training
from app.programs.inputs import all_contexts, data_fields, image_data, make_inputs
from app.programs.run import admit
from app.programs.schemas import ProgramRequest
from tests.scripts import run_script

CHAPTERS = ["gpt", "conv", "rnn"]
DATA = {"gpt": "names", "conv": "mnist", "rnn": "names"}


def request_of(preset_id: str) -> dict:
    return presets.preset(preset_id)["request"]


# --------------------------------------------------------------------------- the data


def test_yseq_is_the_character_after_every_position():
    X, Y, S = (data_fields("names", 5, 200, 3)[f] for f in ("X", "Y", "Yseq"))
    assert X.shape == S.shape == (200, 5) and S.dtype == torch.int64
    assert torch.equal(S[:, :-1], X[:, 1:]) and torch.equal(S[:, -1], Y)
    # in the unshuffled contexts, the next row's context ends with this row's target
    allX, allY = all_contexts(5)
    same_name = allX[1:200, -1] != 0
    assert torch.equal(allX[1:200, -1][same_name], allY[:199][same_name])


@pytest.mark.parametrize("name, side, train_rows", [("mnist", 28, 4000), ("digits", 8, 1438)])
def test_images_are_in_0_1_with_int_labels_shuffled_by_the_seed(name, side, train_rows):
    spec = {"X": {"data": name, "field": "X", "rows": 40},
            "Y": {"data": name, "field": "Y", "rows": 40}}  # fmt: skip
    req = ProgramRequest(inputs=spec, forward="loss = X.sum()")
    made = make_inputs(req.inputs, 0, "float32")
    X, Y = made["X"], made["Y"]
    assert X.shape == (40, 1, side, side) and X.dtype == torch.float32
    assert float(X.min()) == 0.0 and float(X.max()) == 1.0
    assert Y.dtype == torch.int64 and set(Y.tolist()) <= set(range(10)) and len(set(Y.tolist())) > 3
    other = make_inputs(req.inputs, 1, "float32")
    assert not torch.equal(other["X"], X)  # another seed, another shuffle
    assert torch.equal(make_inputs(req.inputs, 0, "float32")["X"], X)
    # the held-out part is apart from the training part
    train, _ = image_data(name, train_rows, 0, "train")
    val, _ = image_data(name, 50, 0, "val")
    flat = {tuple(r) for r in train.view(train_rows, -1).tolist()}
    assert sum(tuple(r) in flat for r in val.view(50, -1).tolist()) < 3  # (a few duplicates)


def test_data_inputs_are_costed_and_refused_past_the_data(client):
    body = {"inputs": {"X": {"data": "digits", "field": "X", "rows": 5000}},
            "forward": "loss = X.sum()"}  # fmt: skip
    r = client.post("/api/program", json=body)
    assert r.status_code == 422 and "digits data's 1,438 training rows" in r.text
    body["inputs"]["X"] = {"data": "mnist", "field": "Yseq", "rows": 5}
    r = client.post("/api/program", json=body)
    assert r.status_code == 422 and "Yseq" in r.text
    body["inputs"] = {"X": {"data": "mnist", "field": "X", "rows": 3},
                      "W": {"shape": [784, 10]}}  # fmt: skip
    body["forward"] = "loss = (X.view(3, -1) @ W).sum()"
    out = client.post("/api/program", json=body).json()
    assert out["tensors"]["X"] == {"shape": [3, 1, 28, 28], "dtype": "float32",
                                   "role": "input", "bytes": 3 * 784 * 4}  # fmt: skip


# --------------------------------------------------------------------------- the presets


@pytest.mark.parametrize("preset_id", CHAPTERS)
def test_each_chapter_checks_all_close_on_its_data_with_train_defaults(client, preset_id):
    listed = {p["id"]: p for p in client.get("/api/programs").json()}
    entry = listed[preset_id]
    assert entry["request"] == request_of(preset_id)
    datas = {s["data"] for s in entry["request"]["inputs"].values() if "data" in s}
    assert datas == {DATA[preset_id]}
    train = entry["train"]
    assert train["steps"] <= 3000 and train["lr"] > 0 and train["batch"] >= 1
    r = client.post("/api/program", json=entry["request"])
    assert r.status_code == 200, r.text[:500]
    body = r.json()
    assert body["backward_error"] is None
    table = body["check"]["tensors"]
    assert body["check"]["all_close"], {n: t["max_abs_err"] for n, t in table.items()}
    assert all(t["written"] and t["allclose"] for t in table.values()), table
    assert not body["check"]["suspects"]


def test_the_gpt_is_one_block_with_a_tied_head(client):
    body = client.post("/api/program", json=request_of("gpt")).json()
    shapes = {n: t["shape"] for n, t in body["tensors"].items()}
    assert shapes["att"] == [32, 4, 8, 8] and shapes["q"] == [32, 4, 8, 8]
    assert shapes["logits"] == [32, 8, 27] and shapes["Yb"] == [32, 8]
    table = body["check"]["tensors"]
    assert len(table) >= 25
    assert len(table["wte"]["lines"]) == 2  # the head's part and the lookup's
    mask = next(e for e in body["forward"] if e["target"] == "mask")
    assert "tril" in mask["code"]


@pytest.mark.parametrize(
    "preset_id, old, new, tensor",
    [
        ("gpt", "dwte.index_add_(0, Xb.view(-1), dtok.view(B * T, C))", "", "wte"),
        ("gpt", "(p * dp).sum(-1, keepdim=True)", "(p * dp).sum(-2, keepdim=True)", "att"),
        ("conv", "dscores /= N", "", "scores"),
        ("rnn", "dh_t = dhs[:, t] + dhnext", "dh_t = dhs[:, t]", "Whh"),
    ],
)
def test_the_chapters_slips_are_flagged_at_their_tensor(client, preset_id, old, new, tensor):
    req = request_of(preset_id)
    assert old in req["backward"]
    body = client.post("/api/program", json={**req, "backward": req["backward"].replace(old, new)})
    assert not body.json()["check"]["tensors"][tensor]["allclose"]


# --------------------------------------------------------------------------- training


def run_training(preset_id: str, steps: int, backward: str | None = None) -> list:
    entry = presets.preset(preset_id)
    req = ProgramRequest(**entry["request"])
    if backward is not None:
        req = req.model_copy(update={"backward": backward})
    t = entry["train"]
    setup = training.prepare(req, steps=steps, batch=t["batch"], lr=t["lr"], seed=t["seed"],
                             eval_every=steps, report_every=None,
                             admit=lambda r: admit(r, 1 << 30, 10.0))  # fmt: skip
    return list(training.train(setup))


def test_a_conv_training_reports_val_loss_and_accuracy():
    events = run_training("conv", 20)
    steps = [e for k, e in events if k == "step"]
    kind, done = events[-1]
    assert kind == "done" and done["steps"] == 20
    assert steps[0]["val_loss"] > 2.0 and 0 <= steps[0]["val_accuracy"] <= 0.5
    assert done["val_loss"] < steps[0]["val_loss"] - 0.5 and done["val_accuracy"] > 0.5
    assert "samples" not in done


# slow: each trains a few hundred steps (the full defaults are measured in the README)
LEARNS = {"gpt": (300, 2.6), "rnn": (300, 2.6), "conv": (100, 0.8)}
BROKEN = {
    "gpt": ("dlogits = (F.softmax(logits, -1) - F.one_hot(Yb, num_classes=V)) / (B * T)",
            "dlogits = (F.softmax(logits, -1) - F.one_hot(Yb, num_classes=V))"),
    "rnn": ("dhraw = (1 - hs[:, t] ** 2) * dh_t", "dhraw = -(1 - hs[:, t] ** 2) * dh_t"),
    "conv": ("dscores[range(N), y] -= 1", "dscores[range(N), y] += 1"),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("preset_id", CHAPTERS)
def test_each_chapter_learns_with_its_own_backward_and_not_with_a_broken_one(preset_id):
    steps, below = LEARNS[preset_id]
    events = run_training(preset_id, steps)
    first = next(e for k, e in events if k == "step")
    kind, done = events[-1]
    assert kind == "done" and done["stopped"] is None
    start = 3.0 if preset_id != "conv" else 2.0
    assert first["loss"] > start and first["val_loss"] > start, first  # the starting weights
    assert done["val_loss"] < below and done["train_loss"] < below, done
    if preset_id != "conv":
        assert len(done["samples"]) == 20 and sum(map(len, done["samples"])) > 40
    old, new = BROKEN[preset_id]
    backward = request_of(preset_id)["backward"]
    assert old in backward
    broken = run_training(preset_id, steps, backward.replace(old, new))[-1][1]
    assert (
        broken["stopped"] == "diverged"
        or broken["val_loss"] is None
        or (broken["val_loss"] > done["val_loss"] + 0.5)
    ), broken


# --------------------------------------------------------------------------- follow


def follow(client, request: dict, grad: str, index: list[int]) -> dict:
    r = client.post("/api/program", json={**request, "follow": {"grad": grad, "index": index}})
    assert r.status_code == 200, r.text[:500]
    out = r.json()["follow"]
    assert out["index"] == index
    assert out["sum"] == pytest.approx(out["value"], rel=1e-4, abs=1e-7), out
    if out["terms_total"] <= 4096:
        assert sum(t["value"] for t in out["terms"]) == pytest.approx(out["sum"], abs=1e-7)
    return out


@pytest.fixture(scope="module")
def gpt_inputs():
    return make_inputs(ProgramRequest(**request_of("gpt")).inputs, 0, "float32")


def test_follow_a_gpt_attention_weight_through_its_matmul(client):
    out = follow(client, request_of("gpt"), "dWq", [3, 5])
    assert out["grad"] == "dWq" and out["code"] == "dWq = xn.view(B * T, C).T @ dq2"
    assert out["terms_total"] == 32 * 8 == len(out["terms"])  # one product per row of B*T
    term = out["terms"][7]
    (a, ia), (b, ib) = term["index"].items()
    assert ia == [3, 7] and ib == [7, 5]
    assert term["value"] == pytest.approx(term["factors"][a] * term["factors"][b], rel=1e-5)
    same = follow(client, request_of("gpt"), "Wq", [3, 5])  # the tensor's own name
    assert same["value"] == out["value"]


def test_follow_index_add_lists_every_repeat_of_the_id(client, gpt_inputs):
    ids = gpt_inputs["Xb"].reshape(-1)
    row = int(ids[ids != 0][0])
    out = follow(client, request_of("gpt"), "dwte", [row, 3])
    assert out["code"].startswith("dwte.index_add_")
    assert out["terms_total"] == 1 + int((ids == row).sum())  # the head's part, then each id
    assert next(iter(out["terms"][0]["index"])) == "dwte (before)"


def test_follow_a_masked_attention_position_has_p_zero(client):
    out = follow(client, request_of("gpt"), "datt", [0, 1, 2, 5])  # t=2 cannot see s=5
    assert out["terms_total"] == 1 and out["value"] == 0
    assert out["terms"][0]["factors"]["p"] == 0
    seen = follow(client, request_of("gpt"), "datt", [0, 1, 5, 2])
    assert seen["terms"][0]["factors"]["p"] > 0


def test_follow_a_broadcast_sum_and_an_accumulation_in_a_loop(client):
    out = follow(client, request_of("gpt"), "dlnf_g", [4])
    assert out["terms_total"] == 32 * 8
    rnn = follow(client, request_of("rnn"), "dWhh", [1, 2])
    assert rnn["code"] == "dWhh += prev[:, t].T @ dhraw"
    assert rnn["terms_total"] == 1 + 32  # the sum so far, then this step's products


def test_follow_max_pool_and_fold_windows(client):
    from tests.programs.test_language_v4 import CONV_BACKWARD, CONV_FORWARD, CONV_INPUTS

    request = {"inputs": CONV_INPUTS, "forward": CONV_FORWARD, "backward": CONV_BACKWARD,
               "dtype": "float64"}  # fmt: skip
    inner = follow(client, request, "dx", [1, 2, 3, 3])
    assert inner["code"].startswith("dx = F.fold") and inner["terms_total"] == 9  # 3x3 windows
    corner = follow(client, request, "dx", [1, 2, 0, 0])
    assert corner["terms_total"] == 4  # padding 1: only four windows reach a corner
    # a max-pool winner gets its window's gradient through scatter_add_
    body = client.post("/api/program", json=request).json()
    r = make_inputs(ProgramRequest(**request).inputs, 0, "float64")
    cols = torch.nn.functional.conv2d(r["x"], r["w"], r["b"], padding=1).relu()
    _, idx = torch.nn.functional.max_pool2d(cols, 2, return_indices=True)
    place = int(idx[0, 1, 0, 0])
    out = follow(client, request, "dr", [0, 1, place // 6, place % 6])
    assert out["code"].startswith("dr.scatter_add_") and out["terms_total"] == 2
    assert body["check"]["all_close"]


def test_follow_names_a_gradient_and_an_index_inside_it(client):
    r = client.post("/api/program", json={**request_of("rnn"),
                                          "follow": {"grad": "dWz", "index": [0]}})  # fmt: skip
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "follow", "grad"]
    r = client.post("/api/program", json={**request_of("rnn"),
                                          "follow": {"grad": "dWhh", "index": [64, 0]}})  # fmt: skip
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "follow", "index"]


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("preset_id", CHAPTERS)
def test_each_chapter_exports_a_script_that_reaches_the_servers_verdict(
    client, tmp_path, preset_id
):
    request = request_of(preset_id)
    server = client.post("/api/program", json=request).json()
    r = client.post("/api/export", json={"program": request, "format": "py"})
    assert r.status_code == 200, r.text[:300]
    path = tmp_path / "program.py"
    path.write_text(r.text)
    done = run_script([path], timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"loss {server['loss']}" in done.stdout  # the same data, the same numbers
    assert f"all {len(server['check']['tensors'])} written gradients match" in done.stdout
    broken = {**request, "backward": request["backward"].replace(BROKEN[preset_id][0],
                                                                 BROKEN[preset_id][1])}  # fmt: skip
    r = client.post("/api/export", json={"program": broken, "format": "py"})
    path.write_text(r.text)
    done = run_script([path], timeout=300)
    assert done.returncode != 0
