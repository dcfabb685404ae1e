"""A blocking generator (a training loop), stepped in worker threads for an async stream.

Each `next()` runs in a worker thread (the run slot's lane thread when one is given), so the
event loop stays free. When the stream is
cancelled (the client went away) while a `next()` is running, `stop` is set, which the
generator checks every step, and the cancellation waits for that step to end: the thread
never outlives the stream by more than one step, and a run slot held around the stream is
not released while the work still runs.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

import anyio

from app.server.limits import Lane

T = TypeVar("T")
_END = object()


async def iterate_in_threads(
    items: Iterator[T], stop: threading.Event, lane: Lane | None = None
) -> AsyncIterator[T]:
    while True:
        if lane is None:
            item = await _next_in_thread(items, stop)
        else:  # a step cancelled before it started never starts
            try:
                item = await lane.run_sync(next, items, _END, on_cancel=stop.set)
            except anyio.get_cancelled_exc_class():
                stop.set()
                raise
        if item is _END:
            return
        yield item  # type: ignore[misc]


async def _next_in_thread(items: Iterator[T], stop: threading.Event) -> object:
    lock = threading.Lock()
    started, abandoned = threading.Event(), threading.Event()
    finished = threading.Event()

    def step() -> object:
        with lock:  # either it starts, or the stream has given it up: never both
            if abandoned.is_set():
                return _END
            started.set()
        try:
            return next(items, _END)
        finally:
            finished.set()

    try:
        return await anyio.to_thread.run_sync(step, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        stop.set()  # the generator returns at its next step
        with lock:
            abandoned.set()
            running = started.is_set()
        if running:  # wait for its step to end (a cancelled call may never have started)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(finished.wait)
        raise
