"""A blocking generator (a training loop), stepped on a run slot's lane thread for an async
stream.

Each `next()` runs on the lane's thread, so the event loop stays free. When the stream is
cancelled (the client went away) while a `next()` is running, `stop` is set, which the
generator checks every step, and the cancellation waits for that step to end: the thread
never outlives the stream by more than one step, and a run slot held around the stream is
not released while the work still runs. A step cancelled before it started never starts.
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
    items: Iterator[T], stop: threading.Event, lane: Lane
) -> AsyncIterator[T]:
    while True:
        try:
            item = await lane.run_sync(next, items, _END, on_cancel=stop.set)
        except anyio.get_cancelled_exc_class():
            stop.set()  # also when the step never started: the stream is over
            raise
        if item is _END:
            return
        yield item  # type: ignore[misc]
