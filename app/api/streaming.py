"""A blocking generator (a training loop), stepped on a run slot's lane thread for an async
stream, in slices: each slice takes a run slot, steps the generator on its lane's thread
until an item to send comes or `slice_s` has passed, and gives the slot back, so that a
waiting run gets it within one slice (one step, when a step is longer than a slice).

When the stream is cancelled (the client went away) while a slice is running, `stop` is set,
which the generator checks every step, and the cancellation waits for that step to end: the
thread never outlives the stream by more than one step, and the slot is not released while
the work still runs. A slice cancelled before it started never starts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

import anyio
import orjson
from fastapi.sse import ServerSentEvent

from app.server.lanes import Lane

T = TypeVar("T")
_END = object()  # the generator is over
_PAUSE = object()  # the slice is over: the slot goes back before the next one


def _advance(items: Iterator[T], slice_s: float, skip: Callable[[T], bool]) -> object:
    """`next(items)` until an item not to `skip` comes (that item), the generator ends
    (_END) or `slice_s` has passed (_PAUSE)."""
    end = time.perf_counter() + slice_s
    while True:
        item = next(items, _END)
        if item is _END or not skip(item):  # type: ignore[arg-type]
            return item
        if time.perf_counter() >= end:
            return _PAUSE


async def iterate_in_slices(
    items: Iterator[T],
    stop: threading.Event,
    slot: Callable[[], AbstractAsyncContextManager[Lane]],
    slice_s: float,
    skip: Callable[[T], bool] = lambda item: False,
) -> AsyncIterator[T]:
    """The items of `items` but those to `skip` (a pause point: the generator's "step"
    items), each slice on a `slot()` of its own."""
    while True:
        async with slot() as lane:
            try:
                item = await lane.run_sync(_advance, items, slice_s, skip, on_cancel=stop.set)
            except anyio.get_cancelled_exc_class():
                stop.set()  # also when the slice never started: the stream is over
                raise
        if item is _END:
            return
        if item is not _PAUSE:
            yield item  # type: ignore[misc]


def event(kind: str, payload: dict) -> ServerSentEvent:
    """One server-sent event of a training stream."""
    # orjson: numpy arrays natively, NaN and Infinity as null (strict JSON)
    return ServerSentEvent(
        event=kind, raw_data=orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY).decode()
    )
