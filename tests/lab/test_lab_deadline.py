"""The deadline reaches inside a learner's formula (issue 22, item 3): a formula is one step
of the backward pass, but the run's cancel token is polled between its lines and after every
op it computes, so no run holds its slot past the deadline by more than one op."""

from __future__ import annotations

import time

import pytest
import torch
from fastapi.testclient import TestClient

from app.lab.evaluation import evaluate
from app.lab.parse import parse
from app.main import create_app
from app.ops.cancel import RunCancelled, cancel_token, check_cancelled
from app.ops.traced import Traced
from app.runs import pipeline
from app.schemas import RunRequest
from app.server import lanes
from app.settings import Settings

# One heavy op, (N, in, 1) * (in, hidden): (1000, 784, 50), ~40M products, and its reduction.
# A formula of one line of such terms: only the poll after every op can stop it midway (the
# poll between lines never comes); it ends with the right x.g, so nothing reruns.
HEAVY = "(x.unsqueeze(-1) * w1).sum(-1)"  # (B, in, hidden) -> (B, in)


def heavy_formula(terms: int) -> str:
    return "(" + " + ".join([HEAVY] * terms) + ") * 0 + l1.g @ w1.T"


CONFIG = {"batch": 1000, "in_features": 784, "hidden": [50], "strategy": "matmul"}


class SetAfter:
    """A cancel token that turns set `seconds` after its first poll, and remembers when it
    first answered True."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start: float | None = None
        self.fired: float | None = None

    def is_set(self) -> bool:
        now = time.perf_counter()
        if self.start is None:
            self.start = now
        if now - self.start >= self.seconds:
            self.fired = self.fired or now
            return True
        return False


class Never:
    def is_set(self) -> bool:
        return False


def longest_op_s() -> float:
    """The slowest single op of HEAVY on this machine now (the broadcast product)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1000, 784, 1, generator=g), torch.randn(784, 50, generator=g)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        (x * w).sum(-1)
        times.append(time.perf_counter() - start)
    return max(times)


def test_check_cancelled_reads_the_current_runs_token():
    check_cancelled()  # no run: nothing to stop
    with cancel_token(SetAfter(0)):
        with pytest.raises(RunCancelled):
            check_cancelled()
        with cancel_token(Never()):  # a nested run has its own
            check_cancelled()
    check_cancelled()  # the token is gone with its run


def test_the_evaluator_polls_between_lines():
    """Lines of plain numbers make no op: only the poll between lines can stop them."""
    formula = parse("x.g", "n = 2\nm = n * 3\nx")
    x = Traced.leaf(torch.ones(2, 3), "x")
    assert evaluate(formula, {"x": x}, {}).t is x.t
    with cancel_token(SetAfter(0)), pytest.raises(RunCancelled):
        evaluate(formula, {"x": x}, {})


def test_ops_on_meta_tensors_are_not_polled():
    """The dry run is shapes only and happens before the run: a set token does not stop it."""
    x = Traced.leaf(torch.empty(2, 3, device="meta"), "x")
    with cancel_token(SetAfter(0)):
        assert (x * 2).sum(0).shape == (3,)


class SetAfterPolls:
    """A cancel token that turns set at its `polls`-th poll, and counts the polls made after
    that (each poll comes after one op, or between two lines or chunks)."""

    def __init__(self, polls: float) -> None:
        self.polls_left = polls
        self.polls = 0
        self.after = 0

    def is_set(self) -> bool:
        self.polls += 1
        if self.polls > self.polls_left:
            self.after += 1
            return True
        return False


def test_a_run_stops_inside_a_formula_within_one_op_of_the_deadline(op_count):
    """Counted, not timed: the run polls after every op, and the first poll that finds the
    token set stops it (no op is computed after it)."""
    # counted, so any size shows it: a batch of 10, not the 40M products of the API test
    cfg = RunRequest(**{**CONFIG, "batch": 10}, formulas={"x.g": heavy_formula(10)})
    whole = SetAfterPolls(float("inf"))
    pipeline.run(cfg, 4 << 20, whole)
    ops = op_count.take(real=True)
    deadline = whole.polls // 2  # half-way through: inside the formula's one line
    token = SetAfterPolls(deadline)
    with pytest.raises(RunCancelled):
        pipeline.run(cfg, 4 << 20, token)
    assert token.after == 1  # stopped at the first poll past the deadline
    assert token.polls == deadline + 1
    # the premise: the formula's one line is many ops (polled after each), so only the poll
    # after an op could stop it midway (the poll between lines never comes)
    assert ops >= 30 and op_count.take(real=True) < ops


def test_an_accepted_formula_is_stopped_at_the_deadline_through_the_api(op_count, monkeypatch):
    """Through the limiter: the token is set on the lane's thread (a context variable set by
    the pipeline), and the answer is the deadline's 422 well before the formula would end
    (its ops counted: fewer than half the whole formula's). The wall-clock net is moved out of
    the way: on a loaded machine it would answer 503 (busy) first, a different test's case."""
    monkeypatch.setattr(lanes, "wall_limit_s", lambda deadline_s: 1000.0)
    body = {**CONFIG, "formulas": {"x.g": heavy_formula(5)}}
    pipeline.run(RunRequest(**body), 4 << 20, Never())
    whole = op_count.take(real=True)

    settings = Settings(
        run_deadline_s=0.05, torch_threads=1, max_concurrent_runs=1, memory_budget_bytes=4 << 30
    )  # the budget counts every line's product as kept: this test is about time
    with TestClient(create_app(settings)) as client:
        op_count.take()  # the app's warm-up
        r = client.post("/api/run", json=body)
        made = op_count.take(real=True)
    assert r.status_code == 422, r.text[:300]
    (error,) = r.json()["detail"]
    assert error["type"] == "work_limit" and "BROADPROP_RUN_DEADLINE_S" in error["msg"]
    assert made < whole / 2, (made, whole)
