"""Run slots that nobody can hold for long (issue 13): a run stops between two of its ops or
chunks once its client hangs up or its deadline passes, freeing the slot; a small run has a
lane of its own beside a giant one; the work model counts every pass; memory goes back."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import anyio
import pytest
import torch
from fastapi.testclient import TestClient

from app.cost import work
from app.main import create_app
from app.ops.cancel import RunCancelled
from app.runs import pipeline
from app.sandbox.allocator import release_memory
from app.schemas import RunRequest
from app.server.lanes import CancelToken, RunLimiter, Saturated, Stopped
from app.settings import Settings


def in_own_loop(fn, *args):
    """anyio.run in a thread of its own (the browser tests keep a loop on this one)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(anyio.run, fn, *args).result()


class CountingToken:
    """A cancel token that turns set at its `after`-th check, and counts the checks."""

    def __init__(self, after: int) -> None:
        self.after, self.checks = after, 0

    def is_set(self) -> bool:
        self.checks += 1
        return self.checks >= self.after


def test_a_run_stops_within_one_chunk_once_cancelled():
    # 2048 -> 2048: one row per 16 MB chunk, so batch 64 is 64 chunks per formula pair
    cfg = RunRequest(batch=64, in_features=2048, hidden=[2048], max_cells=16)
    forward_checks = len(pipeline.Network.from_config(cfg).ops)
    token = CountingToken(after=forward_checks + 5)  # set during the first layer's chunks
    with pytest.raises(RunCancelled):
        pipeline.run(cfg, 4 << 20, token)
    assert token.checks == forward_checks + 5  # not one chunk more


@pytest.mark.parametrize("stage", range(1, 12))
def test_every_stage_stops_when_cancelled(stage):
    """Wherever the token turns set (forward, backward, check, fd, compare), the run stops
    at the next check."""
    cfg = RunRequest(batch=8, in_features=5, hidden=[4], fd_samples=2, compare=True)
    token = CountingToken(after=stage)
    with pytest.raises(RunCancelled):
        pipeline.run(cfg, 4 << 20, token)
    assert token.checks == stage


def test_an_unset_token_changes_nothing():
    cfg = RunRequest(batch=8, in_features=5, hidden=[4], fd_samples=2)
    plain, watched = pipeline.run(cfg, 4 << 20), pipeline.run(cfg, 4 << 20, CountingToken(10**9))
    assert plain["check"] == watched["check"] and plain["loss"] == watched["loss"]


def stand_in_run(
    between_checks, token: CancelToken, done: threading.Event, limit_s: float = 30
) -> str:
    """Stands in for a long run: `between_checks()` between two checks of its token."""
    end = time.monotonic() + limit_s
    try:
        while time.monotonic() < end:
            if token.is_set():
                raise RunCancelled("stopped")
            between_checks()
        return "finished"
    finally:
        done.set()


def polling_run(token: CancelToken, done: threading.Event, limit_s: float = 30) -> str:
    """A run that waits: 'chunks' of 10 ms asleep (no CPU time)."""
    return stand_in_run(lambda: time.sleep(0.01), token, done, limit_s)


def burning_run(token: CancelToken, done: threading.Event, limit_s: float = 30) -> str:
    """A run that computes: CPU work between its checks."""
    return stand_in_run(lambda: sum(range(10_000)), token, done, limit_s)


def test_a_client_hanging_up_frees_the_slot():
    """The issue's attack: a giant run whose client leaves at once held every slot for 18 s.
    Now the run stops at its next check, and the slot is free for the next run."""
    limiter = RunLimiter(slots=1, wait_s=0)
    done = threading.Event()

    async def scenario():
        token = CancelToken()

        async def receive():
            await anyio.sleep(0.2)
            return {"type": "http.disconnect"}

        with pytest.raises(Stopped) as stopped:
            await limiter.run(polling_run, token, done, cancel=token, receive=receive)
        assert stopped.value.reason == "disconnect"
        assert done.is_set()  # the run itself has ended, not just the request
        # the large lane is free again: a run that may not wait at all gets it
        return await limiter.run(lambda: "next")

    assert in_own_loop(scenario) == "next"


@pytest.mark.parametrize(
    "run, reason", [(burning_run, "deadline"), (polling_run, "busy")], ids=["computing", "waiting"]
)
def test_the_deadline_stops_a_run(run, reason):
    """A run that computes is stopped once it has used the deadline's CPU time; one that gets
    no CPU (a machine busy elsewhere) by the wall-clock net, as "busy"."""
    limiter = RunLimiter(slots=1, wait_s=0, deadline_s=0.1)
    done = threading.Event()

    async def scenario():
        token = CancelToken()
        with pytest.raises(Stopped) as stopped:
            await limiter.run(run, token, done, cancel=token)
        return stopped.value.reason

    assert in_own_loop(scenario) == reason
    assert done.is_set()


def test_the_deadline_counts_the_runs_own_cpu_time():
    """A run that computes stops once its thread has used the deadline's CPU time; a run that
    waits (a machine busy elsewhere) is stopped only by the wall-clock net, 4x later."""
    token = CancelToken()
    token.arm(0.05)
    assert not token.is_set()  # the first poll starts the clock
    end = time.monotonic() + 30
    while not token.is_set() and time.monotonic() < end:
        sum(range(10_000))  # CPU work
    assert token.is_set() and token.reason == "deadline"
    idle = CancelToken()
    idle.arm(0.05)
    idle.is_set()
    time.sleep(0.2)  # wall time passes, CPU time does not
    assert not idle.is_set()


def test_a_stopped_run_is_a_422_naming_the_deadline_or_a_503_when_the_machine_is_busy(
    monkeypatch,
):
    """Over its deadline's CPU time, the run is too big: 422. Within it but starved of CPU
    past the wall-clock net, the run is fine and the server busy: 503 with Retry-After (the
    page waits and asks again)."""
    app = create_app(Settings(run_deadline_s=0.1))
    for run, status in ((burning_run, 422), (polling_run, 503)):

        def slow(cfg, chunk_bytes, cancel, traces=None, run=run):
            run(cancel, threading.Event())

        monkeypatch.setattr(pipeline, "run", slow)
        with TestClient(app, raise_server_exceptions=False) as client:
            r = client.post("/api/run", json={"batch": 2, "in_features": 3})
        assert r.status_code == status
        if status == 422:
            (error,) = r.json()["detail"]
            assert error["type"] == "work_limit" and "BROADPROP_RUN_DEADLINE_S" in error["msg"]
        else:
            assert int(r.headers["retry-after"]) >= 1 and "busy" in r.json()["detail"]


def test_a_small_run_does_not_wait_behind_a_giant_one():
    """One slot per lane: while a giant run holds the large lane, a small run is served at
    once (no queue wait allowed) and another large one is refused."""
    limiter = RunLimiter(slots=1, wait_s=0)
    release, started = threading.Event(), threading.Event()

    def giant():
        started.set()
        assert release.wait(30)
        return "giant"

    async def scenario():
        results = {}
        async with anyio.create_task_group() as group:

            async def run_giant():
                results["giant"] = await limiter.run(giant, work_s=60.0)

            group.start_soon(run_giant)
            await anyio.to_thread.run_sync(started.wait)
            results["small"] = await limiter.run(lambda: "small", work_s=0.01)
            with pytest.raises(Saturated):
                await limiter.run(lambda: "large", work_s=1.0)
            release.set()
        return results

    assert in_own_loop(scenario) == {"giant": "giant", "small": "small"}


# --- the work model ----------------------------------------------------------------------


def test_the_work_model_counts_every_pass():
    base = RunRequest(batch=2000, in_features=512, hidden=[512])
    plain = work.estimate(base, 4 << 20)
    assert plain.recheck > 0  # small enough to be rechecked: counted
    big = work.estimate(base.model_copy(update={"batch": 60_000}), 4 << 20)
    assert big.recheck == 0  # too big for the recheck: it is not run
    fd = work.estimate(
        big_fd := base.model_copy(update={"batch": 60_000, "fd_samples": 1}), 4 << 20
    )
    # a float32 run with fd_samples reruns its manual formulas in float64: at least that much
    float64 = work.estimate(
        big_fd.model_copy(update={"dtype": "float64", "fd_samples": 0}), 4 << 20
    )
    assert fd.finite_difference >= float64.forward + float64.backward
    compare = work.estimate(base.model_copy(update={"compare": True}), 4 << 20)
    assert compare.compare >= 2 * plain.backward  # every strategy timed at least twice
    assert compare.total > plain.total
    assert work.formula_elements(base) == 0  # the hook for the learner's formulas


def test_the_issues_slow_runs_are_refused():
    from app.cost.admission import admit
    from app.refusal import Refused as RequestValidationError

    for fields in (
        {
            "in_features": 2048,
            "hidden": [2048],
            "strategy": "broadcast",
            "fd_samples": 1,
            "batch": 297,
        },
        {"in_features": 4096, "hidden": [4096], "batch": 74},
    ):
        with pytest.raises(RequestValidationError):
            admit(RunRequest(**fields), Settings())


# --- memory ------------------------------------------------------------------------------


def test_release_memory_is_glibcs_malloc_trim():
    import platform

    assert release_memory() is (platform.libc_ver()[0] == "glibc")


# --- the lanes' threads ------------------------------------------------------------------


def thread_and_torch_threads() -> tuple[str, int]:
    return threading.current_thread().name, torch.get_num_threads()


def test_runs_use_their_lanes_kept_threads():
    """Large runs on the large lane's thread with the run's torch threads, small ones on the
    small lane's with one (one OpenMP team in all), the same threads run after run, whatever
    lane is free; and the default for threads started later is left as it was."""
    default = torch.get_num_threads()
    limiter = RunLimiter(slots=1, wait_s=5, torch_threads=2)

    async def scenario():
        return [
            await limiter.run(thread_and_torch_threads, work_s=w) for w in (5.0, 0.01, 5.0, None)
        ]

    large, small, large_again, unknown = in_own_loop(scenario)
    assert large == ("broadprop-large-0", 2) == large_again == unknown
    # the large lane is free, yet the small run takes the small lane: a config always runs
    # with the same thread count (the same answer, bit for bit); it has one slot per thread
    assert small[0] in ("broadprop-small-0", "broadprop-small-1") and small[1] == 1
    fresh: list[int] = []
    t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert fresh == [default]


def test_a_lane_job_cancelled_while_queued_never_runs():
    lane = RunLimiter(slots=1, wait_s=5, torch_threads=1).lanes["large"]
    started, release, ran = threading.Event(), threading.Event(), []

    def blocking():
        started.set()
        assert release.wait(30)
        ran.append("blocking")

    async def scenario():
        async with anyio.create_task_group() as group:
            group.start_soon(lane.run_sync, blocking)
            await anyio.to_thread.run_sync(started.wait)
            with anyio.move_on_after(0.05):  # the lane's one thread is busy: queued
                await lane.run_sync(ran.append, "queued")
            release.set()
        await lane.run_sync(time.sleep, 0.05)  # anything queued before this has run by now
        return list(ran)

    assert in_own_loop(scenario) == ["blocking"]


def test_a_lane_job_cancelled_while_running_is_asked_to_stop_and_waited_for():
    lane = RunLimiter(slots=1, wait_s=5, torch_threads=1).lanes["large"]
    asked_to_stop, ran = threading.Event(), []

    def stops_when_asked():
        assert asked_to_stop.wait(30)
        time.sleep(0.2)  # still busy after being asked
        ran.append("ended")

    async def scenario():
        with anyio.move_on_after(0.05):
            await lane.run_sync(stops_when_asked, on_cancel=asked_to_stop.set)
        return list(ran)  # the cancel returned only once the job had ended

    assert in_own_loop(scenario) == ["ended"]


def test_free_pages_go_back_once_the_server_is_idle(monkeypatch):
    """Every run's free pages are given back once no run has ended for IDLE_TRIM_S and none is
    in flight: once for a burst of runs, not while runs keep coming."""
    from app.server import lanes

    released: list[float] = []
    monkeypatch.setattr(lanes, "IDLE_TRIM_S", 1.0)
    monkeypatch.setattr(lanes, "release_memory", lambda: released.append(time.monotonic()))
    limiter = RunLimiter(slots=1, wait_s=5)

    async def scenario():
        last = 0.0
        for _ in range(4):  # runs 0.02 s apart: never idle for 1 s
            await limiter.run(lambda: None, work_s=0.01)
            last = time.monotonic()
            await anyio.sleep(0.02)
        assert released == []
        await anyio.sleep(2.5)
        return last

    last = in_own_loop(scenario)
    assert len(released) == 1
    assert released[0] - last >= 1.0
