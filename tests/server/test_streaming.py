"""iterate_in_slices: a blocking generator stepped on a lane's thread, a slice per run slot,
stopped on cancel."""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager

import anyio

from app.api.streaming import iterate_in_slices
from app.server.lanes import RunLimiter


def run_apart(main, timeout: float = 20) -> list:
    """anyio.run(main) in its own thread: the main thread may hold a running loop already
    (Playwright's sync API does, in a full test session); [] if it did not end in time."""
    result: list = []
    runner = threading.Thread(target=lambda: result.append(anyio.run(main)), daemon=True)
    runner.start()
    runner.join(timeout)
    return result


def counting(stop: threading.Event, steps: list[int]):
    while not stop.is_set():
        steps.append(1)
        if len(steps) % 1000 == 0:
            yield len(steps)


def test_cancelling_a_running_step_stops_the_generator_and_waits_for_it():
    steps: list[int] = []
    stop = threading.Event()
    limiter = RunLimiter(slots=1, wait_s=1)

    async def main():
        with anyio.move_on_after(0.2):
            async for _ in iterate_in_slices(counting(stop, steps), stop, limiter.slot, 0.05):
                pass

    assert run_apart(main) == [None]
    assert stop.is_set()
    done = len(steps)
    threading.Event().wait(0.1)
    assert len(steps) == done  # nothing ran after the cancel returned


def test_cancelled_before_its_thread_starts_does_not_hang():
    """With the lane's thread busy, the step never starts: the cancel must not wait for it."""
    stop, release = threading.Event(), threading.Event()
    limiter = RunLimiter(slots=1, wait_s=1)
    lane = limiter.lanes["large"]

    @asynccontextmanager
    async def lane_only():  # a slot on the lane whose only thread is busy
        yield lane

    async def main():
        async with anyio.create_task_group() as tg:
            tg.start_soon(lane.run_sync, release.wait)  # holds the lane's only thread
            await anyio.sleep(0.05)
            with anyio.move_on_after(0.1) as scope:
                async for _ in iterate_in_slices(counting(stop, []), stop, lane_only, 0.05):
                    pass
            release.set()
        return scope.cancelled_caught

    result = run_apart(main)
    assert result == [True], "the cancelled stream hung waiting for a step that never started"
    assert stop.is_set()


def test_a_waiting_run_gets_the_slot_between_two_slices():
    """A stream gives its slot back after every slice: a run asking for it meanwhile gets it
    (waiters are served in turn), and the stream goes on after."""
    stop = threading.Event()
    steps: list[int] = []
    limiter = RunLimiter(slots=1, wait_s=10)

    def run_when_going() -> str:
        return f"ran after {len(steps)} steps"

    async def main():
        results = {}
        async with anyio.create_task_group() as tg:

            async def stream():
                async for _ in iterate_in_slices(counting(stop, steps), stop, limiter.slot, 0.01):
                    if "run" in results and len(steps) > results["steps_at_run"] + 3000:
                        break

            tg.start_soon(stream)
            while len(steps) < 1000:  # the stream is going
                await anyio.sleep(0.01)
            results["run"] = await limiter.run(run_when_going)
            results["steps_at_run"] = len(steps)
        stop.set()
        return results

    (results,) = run_apart(main, timeout=60)
    assert results["run"].startswith("ran after")
    assert len(steps) > results["steps_at_run"]  # the stream went on after the run
