"""Fair under load (issue 25): the learner's formulas' dry run has a lane of its own with a
deadline, costed by its size before it starts, and steps aside for the runs in flight."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import anyio
import pytest
from fastapi.testclient import TestClient

from app.cost import admission, work
from app.main import create_app
from app.schemas import RunRequest
from app.server import lanes
from app.server.lanes import CancelToken, RunLimiter, Saturated, Stopped
from app.settings import Settings

# many requests or sockets at once: the slow lane
pytestmark = pytest.mark.load

SMALL = {"batch": 4, "in_features": 3, "hidden": [5] * 8, "norm": "layernorm"}
GRADS = [f"{p}{k}" for k in range(8, 0, -1) for p in ("a", "n", "l", "gamma", "beta")]


def long_formulas(n: int = len(GRADS), lines: int = 18) -> dict[str, str]:
    """`n` formulas of `lines` lines each (each a no-op chain): a long dry run."""
    chain = "t = t" + ".unsqueeze(0).squeeze(0)" * 3
    return {f"{g}.g": "\n".join([f"t = {g}", *[chain] * lines, "t"]) for g in GRADS[:n]}


def in_own_loop(fn, *args):
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(anyio.run, fn, *args).result()


def test_the_dry_run_is_costed_by_its_length_before_it_starts():
    assert work.dry_run_s(RunRequest()) == 0
    one = work.dry_run_s(RunRequest(**SMALL, formulas=long_formulas(1)))
    every = work.dry_run_s(RunRequest(**SMALL, formulas=long_formulas()))
    assert 0 < one <= work.DRY_RUN_INLINE_S < every
    assert every == pytest.approx(one * len(GRADS), rel=0.05)


@pytest.fixture
def threads_of_check(monkeypatch):
    """The name of the thread each admission ran on."""
    names: list[str] = []
    real = admission.admit

    def spy(cfg, settings):
        names.append(threading.current_thread().name)
        return real(cfg, settings)

    monkeypatch.setattr(admission, "admit", spy)
    return names


def test_a_long_dry_run_takes_the_dry_lane_and_a_short_one_does_not(client, threads_of_check):
    r = client.post("/api/run", json={**SMALL, "formulas": long_formulas(1)})
    assert r.status_code == 200
    r = client.post("/api/run", json={**SMALL, "formulas": long_formulas()})
    assert r.status_code == 200
    assert r.json()["formulas"].keys() == long_formulas().keys()
    short, long = threads_of_check
    assert not short.startswith("broadprop-dry")
    assert long.startswith("broadprop-dry")


def test_a_dry_run_stops_at_its_deadline():
    """At its deadline's CPU time (422), or at the wall-clock net on a busy machine (503)."""
    app = create_app(Settings(run_deadline_s=0.05))
    with TestClient(app) as client:
        # a batch of its own: a trace not cached, so the dry run really runs
        r = client.post("/api/run", json={**SMALL, "batch": 7, "formulas": long_formulas()})
        assert r.status_code in (422, 503)
        if r.status_code == 422:
            (error,) = r.json()["detail"]
            assert error["type"] == "work_limit" and "BROADPROP_RUN_DEADLINE_S" in error["msg"]
        # a run without formulas is not held up by it
        assert client.post("/api/run", json=SMALL).status_code == 200


def test_one_dry_run_at_a_time():
    limiter = RunLimiter(slots=1, wait_s=0)
    release, started = threading.Event(), threading.Event()

    def long_dry_run():
        started.set()
        assert release.wait(30)
        return "first"

    async def scenario():
        results = {}
        async with anyio.create_task_group() as group:

            async def first():
                results["first"] = await limiter.dry_run(long_dry_run, cancel=CancelToken())

            group.start_soon(first)
            await anyio.to_thread.run_sync(started.wait)
            with pytest.raises(Saturated):
                await limiter.dry_run(lambda: "second", cancel=CancelToken())
            # the run lanes are not taken by it
            results["run"] = await limiter.run(lambda: "run", work_s=1.0)
            release.set()
        return results

    assert in_own_loop(scenario) == {"first": "first", "run": "run"}


def test_the_pacer_steps_aside_while_a_run_is_in_flight_and_stops_when_cancelled(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(lanes.time, "sleep", sleeps.append)
    limiter = RunLimiter(slots=1, wait_s=0)
    token = CancelToken()
    pace = limiter.pacer(token)
    pace()
    assert sleeps == []  # nothing in flight: on at once
    limiter.in_flight = 1
    pace()
    assert sum(sleeps) == pytest.approx(lanes.PACE_YIELD_S)  # a bounded wait, then on
    token.set("disconnect")
    with pytest.raises(Stopped):
        pace()


def test_a_run_of_long_formulas_is_weighed_by_their_python_not_its_config():
    """The flood of issue 34: 42 long formulas on a tiny config were costed at 0.07 s and
    took the light runs' lane; their Python (about their dry run's) now weighs them out of it,
    while a short formula on the same config stays light. The work limit is unchanged."""
    settings = Settings()
    heavy = admission.admit(RunRequest(**SMALL, formulas=long_formulas()), settings)
    light = admission.admit(RunRequest(**SMALL, formulas=long_formulas(1)), settings)
    assert heavy.seconds > lanes.SMALL_RUN_S >= light.seconds
    assert admission.admit(RunRequest(), settings).seconds <= lanes.SMALL_RUN_S  # the article


def test_a_run_of_long_formulas_steps_aside_between_them_while_a_light_run_is_in_flight(
    monkeypatch,
):
    """Counted, not timed: the run calls its pacer once before each learner formula, and the
    route's pacer sleeps (the GIL free) only while a light run is in flight, a bounded wait."""
    from app.api import run as route
    from app.engine import network
    from app.runs import pipeline

    cfg = RunRequest(**SMALL, formulas=long_formulas(5))
    calls: list[int] = []
    reset = network.PACE.set(lambda: calls.append(1))
    try:
        pipeline.run(cfg, 4 << 20)
    finally:
        network.PACE.reset(reset)
    # once per formula in its dry run (the trace) and in each backward pass that runs it
    # (the run's, and its rerun in float64)
    assert len(calls) >= 5 + 5 and len(calls) % 5 == 0

    sleeps: list[float] = []
    monkeypatch.setattr(route.time, "sleep", sleeps.append)
    pace = route._steps_aside(CancelToken())
    pace()
    assert sleeps == []  # no light run: on at once
    monkeypatch.setattr(route.Light, "in_flight", 1)
    pace()
    assert sum(sleeps) == pytest.approx(lanes.PACE_YIELD_S)


# --- training takes turns -------------------------------------------------------------------

TINY_TRAINING = {"batch": 40, "in_features": 3, "hidden": [4], "train_batch": 8, "seed": 2}


def test_training_never_runs_a_formula_for_a_gradient_it_skips(monkeypatch):
    """x.g is not needed to train: the learner's x.g formula is not run (unless another
    formula reads x.g); the other formulas are."""
    from app.lab.formulas import LearnerFormula
    from app.runs import train as training
    from app.schemas import TrainRequest

    ran: list[str] = []
    real = LearnerFormula.compute

    def spy(self, env, grads):
        ran.append(self.grad)
        return real(self, env, grads)

    monkeypatch.setattr(LearnerFormula, "compute", spy)
    formulas = {"x.g": "l1.g @ w1.T", "w1.g": "x.T @ l1.g"}
    cfg = TrainRequest(**TINY_TRAINING, steps=3, eval_every=3, formulas=formulas)
    events = list(training.train(cfg, 4 << 20))
    assert events[-1][0] == "done" and events[-1][1]["steps"] == 3
    assert ran == ["w1"] * 3


def test_a_formula_reading_a_skipped_gradient_keeps_it():
    from app.engine.network import Network
    from app.runs import pipeline
    from app.runs import train as training
    from app.schemas import TrainRequest

    formulas = {"x.g": "l1.g @ w1.T", "w1.g": "x.T @ l1.g + 0 * x.g.sum()"}
    cfg = TrainRequest(**{**TINY_TRAINING, "hidden": [3]}, formulas=formulas)
    bound = pipeline.learner_formulas(cfg, Network.from_config(cfg))
    assert set(training.needed_formulas(bound, frozenset({"x"}))) == {"x", "w1"}
    del bound["w1"]
    assert set(training.needed_formulas(bound, frozenset({"x"}))) == set()


def test_a_step_over_its_deadline_ends_the_training():
    from app.runs import train as training
    from app.schemas import TrainRequest

    cfg = TrainRequest(**TINY_TRAINING, steps=50, eval_every=10)

    def token():  # the fourth step's token is set from its start
        token.made += 1
        t = CancelToken()
        if token.made == 4:
            t.set("deadline")
        return t

    token.made = 0
    events = list(training.train(cfg, 4 << 20, step_cancel=token, every_step=True))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and events[-1][1]["stopped"] == "step_deadline"
    assert events[-1][1]["steps"] == 3
    # every step with no progress event is a pause point
    assert kinds[:-1] == ["progress", "step", "step"]


# --- every pass costed ------------------------------------------------------------------------

ISSUE_WIDE = {"batch": 2, "in_features": 128, "hidden": [4096, 4096], "out_features": 3000,
              "activation": "sigmoid", "norm": "batchnorm", "strategy": "broadcast",
              "compare": True}  # fmt: skip


def test_the_issues_wide_compare_config_is_refused_naming_compare():
    from app.cost.admission import refuse_too_much_work
    from app.refusal import Refused as RequestValidationError

    estimate = work.estimate(RunRequest(**ISSUE_WIDE), 4 << 20)
    # drawing its 30 M weights counts, and w.g's whole outer products in every pass
    assert estimate.draw > 0.2
    with pytest.raises(RequestValidationError) as refused:
        refuse_too_much_work(RunRequest(**ISSUE_WIDE))
    (error,) = refused.value.errors()
    assert error["loc"] == ("body", "compare") and "drawing the tensors" in error["msg"]
    refuse_too_much_work(RunRequest(**{**ISSUE_WIDE, "compare": False}))  # accepted


def test_the_weight_gradients_are_written_whole_whatever_the_batch():
    wide = RunRequest(batch=2, in_features=4096, hidden=[4096], strategy="matmul")
    narrow = RunRequest(batch=2, in_features=64, hidden=[64], strategy="matmul")
    assert work.estimate(wide, 4 << 20).backward > 20 * work.estimate(narrow, 4 << 20).backward
