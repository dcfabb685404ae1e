"""The run slots: two lanes of kept threads (so a small run never waits behind a giant one),
a dry-run lane for the learner's formulas, trainings taking turns, and a deadline and
cancellation for each run."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import math
import os
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import torch
from starlette.types import Message

from app.ops import spare
from app.ops.cancel import CancelToken
from app.sandbox.allocator import (
    IDLE_TRIM_S,
    TRIM_DELAY_S,
    TRIM_MIN_BYTES,
    release_memory,
    tune_allocator,
)
from app.sandbox.pool import wall_limit_s
from app.settings import Settings

T = TypeVar("T")


@dataclass(frozen=True)
class Concurrency:
    runs: int  # heavy runs at once (per lane)
    torch_threads: int  # intra-op threads each run may use; runs * threads <= cores


def derive_concurrency(settings: Settings, cores: int | None = None) -> Concurrency:
    """Fill in the 0s (derive) of max_concurrent_runs and torch_threads from the core count,
    so that runs x threads <= cores. With both derived: a run gets up to 4 threads, and the
    cores are split into as many runs as that allows (2 cores: 1 run x 2 threads)."""
    cores = max(1, cores or usable_cores())
    runs, threads = settings.max_concurrent_runs, settings.torch_threads
    if not runs and not threads:
        threads = min(cores, 4)
        runs = max(1, cores // threads)
    elif not threads:
        threads = max(1, cores // runs)
    elif not runs:
        runs = max(1, cores // threads)
    return Concurrency(runs=runs, torch_threads=threads)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), else os.cpu_count()."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class Saturated(Exception):
    """No run slot came free within the queue wait."""


class Stopped(Exception):
    """A run was stopped between two ops or chunks (`reason`): its client hung up
    ("disconnect"), it used its deadline's CPU time ("deadline"), or the machine was too busy
    to give it that time within its wall-clock limit (app/sandbox/pool.py wall_limit_s:
    1.4 x the deadline, 4.2 s for the default 3 s) ("busy")."""

    def __init__(self, reason: str, deadline_s: float, advice: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.deadline_s = deadline_s
        self.advice = advice  # what to change, in the route's own fields (None: a run's)


# Runs estimated to take at most this long go to the small lane: they never queue behind a
# run in the large lane (a small run beside a giant one takes about twice its time alone).
SMALL_RUN_S = 0.25


class Lane:
    """One lane's run threads: `slots` of them, started once and kept for the life of the
    process, each with `torch_threads` of torch's intra-op threads.

    Why not a fresh worker thread per run: every thread that runs torch's parallel ops gets
    its own OpenMP thread team, and while more team threads are alive than cores, libgomp's
    workers stop spin-waiting between parallel regions and sleep instead (its throttled
    spin). A chunked broadcast is hundreds of short parallel regions: at batch 20000 its
    backward took 0.9-1.2 s instead of 0.35 s whenever a second team was alive (the first
    large runs on a fresh server: the warm-up's thread and the run's). Kept threads make one
    team per large-lane thread, warmed at startup; small-lane threads run torch on one thread
    (their runs gain little from more) and have no team at all; on a machine with a second
    core each has a spare thread instead, for its run's independent pieces, each on one torch
    thread too (app/ops/spare.py). A run's lane follows from its
    config alone, so a config always runs with the same thread count: the same answer, bit
    for bit (a 2-thread matmul rounds differently from a 1-thread one)."""

    def __init__(self, name: str, slots: int, torch_threads: int, spares: bool = False) -> None:
        self.name = name
        self.torch_threads = torch_threads
        self.spares = spares
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(slots):
            started = threading.Event()
            threading.Thread(
                target=self._serve,
                args=(started,),
                name=f"broadprop-{name}-{i}",
                daemon=True,  # a run in flight at exit is abandoned, never waited for
            ).start()
            started.wait()

    def _serve(self, started: threading.Event) -> None:
        torch.get_num_threads()  # settles this thread's count: set_num_threads below stays its own
        torch.set_num_threads(self.torch_threads)
        name = threading.current_thread().name
        spare.attach(spare.Spare(f"{name}-spare") if self.spares else None)
        started.set()
        while True:
            future, fn, args = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while queued: never started
            try:
                result = fn(*args)
            except BaseException as e:  # handed to the awaiting request
                future.set_exception(e)
            else:
                future.set_result(result)

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """`fn(*args)` on one of the lane's threads, with the caller's context variables."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((future, contextvars.copy_context().run, (fn, *args)))
        return future

    async def run_sync(
        self, fn: Callable[..., T], *args: Any, on_cancel: Callable[[], None] | None = None
    ) -> T:
        """`fn(*args)` on the lane's thread. Cancelled before it starts, it never starts;
        cancelled while it runs, `on_cancel` is called (to ask it to stop) and the
        cancellation waits for it to end: a slot is never free while its work still runs."""
        future = self.submit(fn, *args)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if not future.cancel():  # already running
                if on_cancel is not None:
                    on_cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.wait([asyncio.wrap_future(future)])
            raise


_lanes: dict[tuple[int, int], dict[str, Lane]] = {}
_lanes_lock = threading.Lock()


def lanes_for(slots: int, torch_threads: int) -> dict[str, Lane]:
    """The process's lanes for this many slots and threads (made on first use, then shared
    by every app in the process: OpenMP teams are per process)."""
    with _lanes_lock:
        if (slots, torch_threads) not in _lanes:
            default = torch.get_num_threads()
            # the small lane: as many one-thread runs at once as the large lane has threads
            # each with a spare thread for its run's independent pieces (app/ops/spare.py)
            # where a run may use two threads: a lone small run then takes both cores
            small = Lane("small", slots * torch_threads, 1, spares=torch_threads > 1)
            large = Lane("large", slots, torch_threads)
            # the learner's formulas' dry runs: Python on meta tensors, one at a time
            dry = Lane("dry", DRY_RUN_SLOTS, 1)
            # each lane thread's set_num_threads also set the default that threads started
            # later take up (a training's, a test's): back to what it was
            torch.set_num_threads(default)
            _lanes[slots, torch_threads] = {"small": small, "large": large, "dry": dry}
        return _lanes[slots, torch_threads]


# A dry run of the learner's formulas is pure Python (the evaluator, Traced ops on meta
# tensors) holding the GIL: 0.5-0.9 s for the largest body. Several at once starved the runs
# (an article run went from 62 ms to 854 ms at the median beside four). So they take a slot of
# their own lane, one at a time (DRY_RUN_SLOTS), with the run deadline; and between two
# formulas a dry run steps aside (sleeps, the GIL free) while a run is in flight, for up to
# PACE_YIELD_S each time: a run is slowed by at most one formula's dry run (2,000 characters:
# ~30 ms), and a dry run still moves on beside a long run or a training.
DRY_RUN_SLOTS = 1

# Trainings at once, per large-lane slot (0 in RunLimiter: this many): they take turns on the
# slots a slice of steps at a time (TRAIN_SLICE_S), so that runs and other trainings get
# their turn within one slice, not after a whole training (up to 300 s)
TRAININGS_PER_SLOT = 2
TRAIN_SLICE_S = 0.05
PACE_YIELD_S = 0.1
PACE_POLL_S = 0.005


class RunLimiter:
    """At most `slots` runs at once in each lane, each on one of its lane's threads (`Lane`)
    so the event loop stays free; a run that cannot start within `wait_s` raises Saturated
    (-> 503 + Retry-After). A run estimated at most SMALL_RUN_S (`work_s`) waits for the
    small lane (slots x torch_threads one-thread slots), any other run (or one of unknown
    work) for the large lane (slots of torch_threads each); never the other lane, so that a
    config always runs with the same thread count. With a `cancel` token, the run is stopped (Stopped) when the
    client hangs up (`receive` gives http.disconnect), once it has used `deadline_s` of CPU
    time, or after `wall_limit_s(deadline_s)` of wall time, between two of its ops
    or chunks. A large-lane run uses `torch_threads` intra-op threads, a small-lane run one.

    Semaphores are made per event loop (TestClient may start one loop per request)."""

    def __init__(
        self,
        slots: int,
        wait_s: float,
        deadline_s: float = math.inf,
        trim: bool = True,
        torch_threads: int = 1,
        trainings: int = 0,
        programs: int = 0,
    ) -> None:
        self.slots = slots
        self.programs = programs or slots * torch_threads
        self.trim = trim
        self.wait_s = wait_s
        self.deadline_s = deadline_s
        self.torch_threads = torch_threads
        self.trainings = trainings or TRAININGS_PER_SLOT * slots
        self.in_flight = 0
        self._release_pending = False
        self._idle_release_pending = False
        self._last_run_end = 0.0
        self.release: Callable[[], object] = release_memory  # gives free pages back
        self._tasks: set[asyncio.Task] = set()
        self._semaphores: weakref.WeakKeyDictionary[Any, dict[str, anyio.Semaphore]] = (
            weakref.WeakKeyDictionary()
        )
        self._trainings: weakref.WeakKeyDictionary[Any, anyio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def lanes(self) -> dict[str, Lane]:
        """The lanes' threads (started on first use, or by `start`)."""
        return lanes_for(self.slots, self.torch_threads)

    async def start(self, warm_up: Callable[[], None] | None = None) -> None:
        """Start the lanes' threads and run `warm_up` once on each lane (torch's first-call
        costs, paid by each thread before a request does)."""
        tune_allocator()
        lanes = await anyio.to_thread.run_sync(lambda: self.lanes)
        if warm_up is not None:
            for lane in lanes.values():
                await lane.run_sync(warm_up)

    def _semaphores_here(self) -> dict[str, anyio.Semaphore]:
        loop = asyncio.get_running_loop()
        if loop not in self._semaphores:
            self._semaphores[loop] = {
                "small": anyio.Semaphore(self.slots * self.torch_threads),
                "large": anyio.Semaphore(self.slots),
                "dry": anyio.Semaphore(DRY_RUN_SLOTS),
                # programs: one per sandbox worker (app/sandbox), queued like the runs
                "program": anyio.Semaphore(self.programs),
            }
        return self._semaphores[loop]

    async def _acquire(
        self, small: bool, lane: str | None = None, wait_s: float | None = None
    ) -> str:
        """A slot's lane name, once one of its semaphore's slots is taken (`lane`: that one,
        else the small or the large one), within `wait_s` (default: the queue wait)."""
        lane = lane or ("small" if small else "large")
        semaphore = self._semaphores_here()[lane]
        try:  # a free slot is taken at once, even with no wait allowed
            semaphore.acquire_nowait()
            return lane
        except anyio.WouldBlock:
            pass
        with anyio.move_on_after(self.wait_s if wait_s is None else wait_s) as scope:
            await semaphore.acquire()
        if scope.cancelled_caught:
            raise Saturated from None
        return lane

    async def run(
        self,
        fn: Callable[..., T],
        *args: Any,
        work_s: float | None = None,
        cancel: CancelToken | None = None,
        receive: Callable[[], Awaitable[Message]] | None = None,
        memory_bytes: int = 0,
    ) -> T:
        try:
            async with self.slot(work_s) as lane:
                if cancel is None:
                    return await lane.run_sync(fn, *args)
                return await self._watched(lane, fn, args, cancel, receive)
        finally:
            if self.trim:
                if memory_bytes >= TRIM_MIN_BYTES:
                    self._release_soon()
                self._release_when_idle()

    @asynccontextmanager
    async def slot(
        self, work_s: float | None = None, wait_s: float | None = None
    ) -> AsyncIterator[Lane]:
        """Hold one run slot for the body (a training holds one for each slice of its
        steps), which runs its work on the lane given (`lane.run_sync`); the lane as for
        `run` (large unless `work_s` is small); Saturated after `wait_s` (default: the queue
        wait). Waiters get a slot in the order they asked."""
        lanes = self.lanes
        name = await self._acquire(work_s is not None and work_s <= SMALL_RUN_S, wait_s=wait_s)
        self.in_flight += 1
        try:
            yield lanes[name]
        finally:
            self.in_flight -= 1
            self._semaphores_here()[name].release()

    @asynccontextmanager
    async def program_slot(self) -> AsyncIterator[None]:
        """One of the `programs` places (one per sandbox worker) for a program's whole
        request; Saturated after the queue wait."""
        name = await self._acquire(False, "program")
        try:
            yield
        finally:
            self._semaphores_here()[name].release()

    async def dry_run(
        self,
        fn: Callable[..., T],
        *args: Any,
        cancel: CancelToken,
        receive: Callable[[], Awaitable[Message]] | None = None,
    ) -> T:
        """`fn(*args)` (a check that dry-runs the learner's formulas) on the dry lane: one
        slot (Saturated after the queue wait), the run's deadline and disconnect watch as
        `run`. Not counted in `in_flight`: the work that `pacer` steps aside for."""
        name = await self._acquire(False, "dry")
        try:
            return await self._watched(self.lanes[name], fn, args, cancel, receive)
        finally:
            self._semaphores_here()[name].release()

    def pacer(self, cancel: CancelToken) -> Callable[[], None]:
        """What a dry run calls between two formulas (app.engine.network.PACE): Stopped once
        `cancel` is set (its deadline, its client gone); while a run is in flight, a sleep
        (GIL released) of up to PACE_YIELD_S, so that the run is not slowed by the dry run."""

        def stop_if_cancelled() -> None:
            if cancel.is_set():
                raise Stopped(cancel.reason or "deadline", self.deadline_s)

        def pace() -> None:
            stop_if_cancelled()
            waited = 0.0
            while self.in_flight and waited < PACE_YIELD_S:
                time.sleep(PACE_POLL_S)
                waited += PACE_POLL_S
            stop_if_cancelled()

        return pace

    @asynccontextmanager
    async def training(self) -> AsyncIterator[None]:
        """One of the `trainings` places for a training stream, for its whole length
        (Saturated at once when none is free): trainings take turns on the run slots, a
        slice each, so their number is bounded apart (each holds its weights)."""
        trainings = self._trainings_here()
        try:
            trainings.acquire_nowait()
        except anyio.WouldBlock:
            raise Saturated from None
        try:
            yield
        finally:
            trainings.release()

    def _trainings_here(self) -> anyio.Semaphore:
        loop = asyncio.get_running_loop()
        if loop not in self._trainings:
            self._trainings[loop] = anyio.Semaphore(self.trainings)
        return self._trainings[loop]

    def _start(self, coroutine) -> None:
        """`coroutine` as a task of its own, held until done (the loop keeps only weak
        references to its tasks)."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _release_soon(self) -> None:
        """Give memory back once the answer has gone out (TRIM_DELAY_S later) and no run is
        in flight; one pending release at a time."""
        if self._release_pending:
            return
        self._release_pending = True

        async def later() -> None:
            try:
                await asyncio.sleep(TRIM_DELAY_S)
                if not self.in_flight:
                    await anyio.to_thread.run_sync(self.release)
            finally:
                self._release_pending = False

        self._start(later())

    def _release_when_idle(self) -> None:
        """Give every run's free pages back (the lane threads' malloc arenas keep them: the
        trim threshold is high) once no run has ended for IDLE_TRIM_S and none is in flight."""
        self._last_run_end = time.monotonic()
        if self._idle_release_pending:
            return  # the pending release waits for this run's end too
        self._idle_release_pending = True

        async def later() -> None:
            try:
                while True:
                    wait = self._last_run_end + IDLE_TRIM_S - time.monotonic()
                    if wait <= 0 and not self.in_flight:
                        break
                    await asyncio.sleep(max(wait, 0.5))
                await anyio.to_thread.run_sync(self.release)
            finally:
                self._idle_release_pending = False

        self._start(later())

    async def _watched(
        self,
        lane: Lane,
        fn: Callable[..., T],
        args: tuple,
        cancel: CancelToken,
        receive: Callable[[], Awaitable[Message]] | None,
    ) -> T:
        outcome: dict[str, Any] = {}

        async def work() -> None:
            try:
                outcome["value"] = await lane.run_sync(fn, *args)
            except Exception as e:  # re-raised below, outside the task group
                outcome["error"] = e
            finally:
                group.cancel_scope.cancel()

        cancel.arm(self.deadline_s)

        async def watch() -> None:
            with anyio.move_on_after(wall_limit_s(self.deadline_s)):
                while receive is not None:
                    if (await receive())["type"] == "http.disconnect":
                        cancel.set("disconnect")
                        return
                await anyio.sleep_forever()
            # the run's own CPU time is still within its deadline (else the token would have
            # said "deadline"): the machine is too busy to give it the time
            cancel.set("busy")

        async with anyio.create_task_group() as group:
            group.start_soon(work)
            group.start_soon(watch)
        if "error" in outcome:
            if cancel.was_set():
                raise Stopped(cancel.reason or "deadline", self.deadline_s) from outcome["error"]
            raise outcome["error"]
        return outcome["value"]
