"""POST /api/program/train: SGD with the learner's own backward. Trainings here are short
(tens of steps) to keep the suite fast; the 3,000-step run of the issue is in the README."""

from __future__ import annotations

import json

import pytest
import torch

from app.programs import presets
from app.programs import train as training
from app.programs.run import admit
from app.programs.schemas import ProgramRequest

MAKEMORE = next(p for p in presets.PRESETS if p["id"] == "makemore")["request"]
ARTICLE = next(p for p in presets.PRESETS if p["id"] == "article")["request"]
ACCUMULATE = "dcounts += torch.ones_like(counts) * dcounts_sum"  # the second use of counts


def parse_sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        kind = data = None
        for line in block.splitlines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
        if kind:
            events.append((kind, data))
    return events


def train(client, program: dict, **fields) -> list[tuple[str, dict]]:
    body = {"program": program, "steps": 30, "batch": 32, "lr": 0.2, "seed": 0, **fields}
    response = client.post("/api/program/train", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return parse_sse(response.text)


@pytest.fixture(scope="module")
def right(client) -> list[tuple[str, dict]]:
    """The makemore preset trained with its own solution (one training for the module)."""
    return train(client, MAKEMORE, eval_every=30)


def test_makemore_with_its_own_solution_lowers_the_loss_and_samples_names(right):
    steps = [d for k, d in right if k == "step"]
    kind, done = right[-1]
    assert kind == "done"
    first = steps[0]
    assert first["step"] == 1 and first["val_loss"] > 3.0  # about ln 27 at the start
    assert done["steps"] == 30 and done["stopped"] is None
    assert done["val_loss"] < first["val_loss"] - 0.25
    assert done["trained"] == ["C", "W1", "b1", "W2", "b2", "bngain", "bnbias"]
    assert done["fixed"] == []
    assert len(done["samples"]) == 20
    assert all(set(s) <= set("abcdefghijklmnopqrstuvwxyz") for s in done["samples"])
    assert steps[-1]["step"] == 30


def test_a_wrong_backward_trains_worse(client, right):
    wrong_program = {**MAKEMORE, "backward": MAKEMORE["backward"].replace(ACCUMULATE, "")}
    wrong = train(client, wrong_program, eval_every=30)[-1][1]
    assert wrong["fixed"] == []  # every parameter still trained, with wrong gradients
    assert wrong["val_loss"] > right[-1][1]["val_loss"] + 0.1


def test_a_parameter_whose_gradient_is_not_written_is_held_fixed_and_named():
    backward = MAKEMORE["backward"].split("dC = torch.zeros_like(C)")[0]
    req = ProgramRequest(**{**MAKEMORE, "backward": backward})
    setup = training.prepare(req, steps=2, batch=32, lr=0.5, seed=0, eval_every=2,
                             report_every=None, admit=lambda r: admit(r, 1 << 30, 10.0))  # fmt: skip
    trainer = training.Trainer(setup, lambda: None)
    before = {n: p.clone() for n, p in trainer.params.items()}
    loss, grads, error = trainer.step()
    assert error is None and "C" not in grads
    trained, fixed = training._decide(trainer.params, grads)
    assert "C" not in trained and fixed == {"C": "the backward does not write its gradient"}
    done = list(training.train(setup))[-1]
    assert done[0] == "done" and done[1]["fixed"] == ["C"] and "W1" in done[1]["trained"]
    # run the loop by hand to see the weights: C never moves, the others do
    for name in trained:
        trainer.params[name].sub_(grads[name], alpha=0.5)
    assert torch.equal(trainer.params["C"], before["C"])
    assert not torch.equal(trainer.params["W1"], before["W1"])


def test_the_same_request_gives_the_same_events(client):
    def losses(events):
        return [(k, d.get("step"), d.get("loss"), d.get("val_loss"), d.get("samples"))
                for k, d in events]  # fmt: skip

    a = train(client, MAKEMORE, steps=4, eval_every=4, report_every=1)
    b = train(client, MAKEMORE, steps=4, eval_every=4, report_every=1)
    assert losses(a) == losses(b)
    assert [d["step"] for k, d in a if k == "step"] == [1, 2, 3, 4]


def test_a_program_without_names_data_trains_on_its_own_inputs(client):
    small = {**ARTICLE, "inputs": {**ARTICLE["inputs"], "x": {"shape": [64, 784]},
                                    "target": {"shape": [64], "grad": False}}}  # fmt: skip
    events = train(client, small, steps=5, lr=1e-6)
    done = events[-1][1]
    assert done["trained"] == ["x", "w1", "b1", "w2", "b2"]  # every input with grad
    assert "samples" not in done and "val_loss" not in done
    steps = [d for k, d in events if k == "step"]
    assert steps[-1]["batch_loss"] < steps[0]["batch_loss"]


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"forward": MAKEMORE["forward"].replace("h @ W2 + b2", "h @ W2.T + b2")}, "forward"),
        ({"backward": MAKEMORE["backward"] + "import os\n"}, "backward"),
    ],
)
def test_a_bad_program_is_a_422_at_its_line_before_the_stream(client, change, where):
    body = {"program": {**MAKEMORE, **change}, "steps": 10}
    response = client.post("/api/program/train", json=body)
    assert response.status_code == 422
    loc = response.json()["detail"][0]["loc"]
    assert loc[:2] == ["body", where] and isinstance(loc[2], int)


def test_steps_are_bounded(client):
    response = client.post("/api/program/train", json={"program": MAKEMORE, "steps": 20001})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "steps"]


def test_should_stop_ends_the_training_within_a_step():
    req = ProgramRequest(**MAKEMORE)
    setup = training.prepare(req, steps=20_000, batch=32, lr=0.1, seed=0, eval_every=None,
                             report_every=None, admit=lambda r: admit(r, 1 << 30, 10.0))  # fmt: skip
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 3  # a few checks in: mid-step (the interpreters poll it too)

    events = list(training.train(setup, should_stop))
    kind, done = events[-1]
    assert kind == "done" and done["stopped"] == "stopped" and done["steps"] <= 1
