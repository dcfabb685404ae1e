"""Fair under load (issue 25): the learner's formulas' dry run has a lane of its own with a
deadline, costed by its size before it starts, and steps aside for the runs in flight."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import anyio
import pytest
from fastapi.testclient import TestClient

from app import work
from app.api import run as run_route
from app.main import create_app
from app.schemas import RunRequest
from app.server import limits
from app.server.limits import CancelToken, RunLimiter, Saturated, Stopped
from app.settings import Settings

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
    """The name of the thread each check_budget ran on."""
    names: list[str] = []
    real = run_route.check_budget

    def spy(cfg, settings):
        names.append(threading.current_thread().name)
        return real(cfg, settings)

    monkeypatch.setattr(run_route, "check_budget", spy)
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
    monkeypatch.setattr(limits.time, "sleep", sleeps.append)
    limiter = RunLimiter(slots=1, wait_s=0)
    token = CancelToken()
    pace = limiter.pacer(token)
    pace()
    assert sleeps == []  # nothing in flight: on at once
    limiter.in_flight = 1
    pace()
    assert sum(sleeps) == pytest.approx(limits.PACE_YIELD_S)  # a bounded wait, then on
    token.set("disconnect")
    with pytest.raises(Stopped):
        pace()
