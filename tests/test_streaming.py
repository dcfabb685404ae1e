"""iterate_in_threads: a blocking generator stepped on a lane's thread, stopped on cancel."""

from __future__ import annotations

import threading

import anyio

from app.api.streaming import iterate_in_threads
from app.server.limits import RunLimiter


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
    lane = RunLimiter(slots=1, wait_s=1).lanes["large"]

    async def main():
        with anyio.move_on_after(0.2):
            async for _ in iterate_in_threads(counting(stop, steps), stop, lane):
                pass

    assert run_apart(main) == [None]
    assert stop.is_set()
    done = len(steps)
    threading.Event().wait(0.1)
    assert len(steps) == done  # nothing ran after the cancel returned


def test_cancelled_before_its_thread_starts_does_not_hang():
    """With the lane's thread busy, the step never starts: the cancel must not wait for it."""
    stop, release = threading.Event(), threading.Event()
    lane = RunLimiter(slots=1, wait_s=1).lanes["large"]

    async def main():
        async with anyio.create_task_group() as tg:
            tg.start_soon(lane.run_sync, release.wait)  # holds the lane's only thread
            await anyio.sleep(0.05)
            with anyio.move_on_after(0.1) as scope:
                async for _ in iterate_in_threads(counting(stop, []), stop, lane):
                    pass
            release.set()
        return scope.cancelled_caught

    result = run_apart(main)
    assert result == [True], "the cancelled stream hung waiting for a step that never started"
    assert stop.is_set()
