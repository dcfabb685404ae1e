"""The one training loop (app/runs/loop.py) both trainers run: its cadence, its stop reasons
and its divergence, over a trainer that only records what it is asked."""

from __future__ import annotations

import math

import pytest

from app.runs import loop as training_loop
from app.runs.loop import Cadence, Failed, Outcome, Stop, loop


class Recorder:
    """Losses from a list; every call the loop makes, in order."""

    def __init__(self, losses, stop_at=None, fail_at=None, stop_in_report=None):
        self.losses, self.calls = list(losses), []
        self.stop_at, self.fail_at, self.stop_in_report = stop_at, fail_at, stop_in_report

    def step(self, number):
        self.calls.append(("step", number))
        if number == self.stop_at:
            raise Stop("step_deadline")
        if number == self.fail_at:
            raise Failed(f"step {number}: broken")
        return self.losses[number - 1]

    def before_update(self, step, reporting):
        self.calls.append(("before", step, reporting))

    def update(self):
        self.calls.append(("update",))

    def report(self, cadence: Cadence, loss, batch_loss):
        self.calls.append(("report", cadence.step, cadence.evaluate))
        if cadence.step == self.stop_in_report:
            raise Stop("stopped")
        return {"step": cadence.step, "loss": loss, "batch_loss": batch_loss}


def run(trainer, steps, **kw):
    options = dict(start=0.0, report_every=2, eval_every=3, should_stop=lambda: False,
                   time_limit_s=None, kind="progress")  # fmt: skip
    options.update(kw)
    gen = loop(trainer, steps, **options)
    events = []
    try:
        while True:
            events.append(next(gen))
    except StopIteration as end:
        return events, end.value


def test_reports_at_the_first_every_nth_and_last_step_with_the_mean_since_the_last():
    t = Recorder([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    events, outcome = run(t, 7, between=True)
    assert [(k, e["step"]) for k, e in events] == [
        ("progress", 1), ("progress", 2), ("progress", 3), ("progress", 4), ("step", 5),
        ("progress", 6), ("progress", 7),
    ]  # fmt: skip
    assert [e["loss"] for k, e in events if k == "progress"] == [1.0, 2.0, 3.0, 4.0, 5.5, 7.0]
    assert [c for c in t.calls if c[0] == "report"] == [
        ("report", 1, True), ("report", 2, False), ("report", 3, True), ("report", 4, False),
        ("report", 6, True), ("report", 7, True),
    ]  # fmt: skip
    assert outcome == Outcome(7, None, 7.0)
    # each step: counted, looked at before its update, updated, then reported
    assert t.calls[:4] == [("step", 1), ("before", 1, True), ("update",), ("report", 1, True)]


def test_a_loss_that_is_not_finite_is_reported_unupdated_and_ends_the_training():
    t = Recorder([1.0, 1.0, 1.0, math.inf, 1.0])
    events, outcome = run(t, 5, report_every=10, eval_every=10)
    assert [e["step"] for _, e in events] == [1, 4]
    assert events[-1][1]["batch_loss"] is None and events[-1][1]["loss"] is None
    assert t.calls.count(("update",)) == 3
    assert outcome.stopped == "diverged" and outcome.steps == 4 and outcome.last_loss == math.inf


@pytest.mark.parametrize(
    ("kw", "reason", "steps"),
    [
        (dict(should_stop=lambda: True), "stopped", 0),
        (dict(time_limit_s=-1.0), "time_limit", 0),
        (dict(recorder=dict(stop_at=3)), "step_deadline", 2),
        (dict(recorder=dict(stop_in_report=3)), "stopped", 3),
    ],
    ids=["asked", "time", "step", "report"],
)
def test_every_stop_says_why_and_how_far_it_got(kw, reason, steps):
    t = Recorder([1.0] * 6, **kw.pop("recorder", {}))
    events, outcome = run(t, 6, **kw)
    assert (outcome.stopped, outcome.steps) == (reason, steps)
    assert all(e["step"] < 3 for _, e in events)  # a report that stopped is not sent


def test_a_failed_step_is_an_error_event_and_no_outcome():
    events, outcome = run(Recorder([1.0] * 5, fail_at=2), 5)
    assert events[-1] == ("error", {"detail": "step 2: broken"})
    assert outcome is None


def test_both_trainers_run_this_loop():
    from app.programs import train as programs_train
    from app.runs import train as runs_train

    assert runs_train.loop is training_loop.loop and programs_train.loop is training_loop.loop
    assert not hasattr(runs_train, "stop_reason") and not hasattr(programs_train, "stop_reason")
