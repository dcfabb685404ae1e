"""A run's spare core: independent pieces of one run computed on a second thread.

A small run computes torch on one thread (app/server/lanes.py: its answer must not depend on
how many threads it got). On a two-core machine that leaves a core idle while the run's own
pieces could go side by side: autograd's reference beside the manual forward and backward,
half of a broadcast's chunks beside the other half. Each piece runs on one torch thread on
either side, and every sum adds its parts in the same order whoever made them, so the answer
is the same bit for bit with or without a spare.

A lane thread that has one attaches it (`attach`); code anywhere below asks `alongside(fn)`
and gets something to `.result()` later: the spare's future, or, with no spare attached, the
call made right there. The spare's CPU time is lent to the run's cancel token, so its
deadline counts the run's whole work.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import torch

from app.ops import cancel as cancelling

T = TypeVar("T")

_local = threading.local()


class Spare:
    """One kept thread with one torch thread, for the pieces of runs on one lane thread."""

    def __init__(self, name: str) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=name, initializer=_one_torch_thread
        )
        self._pool.submit(torch.get_num_threads).result()  # started and settled now

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """`fn(*args)` on the spare, with the caller's context variables (the precision, the
        cancel token read-only) and its CPU time lent to that token."""
        context = contextvars.copy_context()
        token = cancelling.current_token()
        return self._pool.submit(context.run, _lent, token, fn, *args)


def _one_torch_thread() -> None:
    torch.get_num_threads()  # settles this thread's count, so the one below stays its own
    torch.set_num_threads(1)


def _lent(token: Any, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` with the run's token visible only as a flag (the deadline's clock is the
    run thread's), its CPU time added to the token's afterwards."""
    start = time.thread_time()
    try:
        with cancelling.cancel_token(None if token is None else cancelling.FlagOnly(token)):
            return fn(*args)
    finally:
        if token is not None and hasattr(token, "lend"):
            token.lend(time.thread_time() - start)


def attach(spare: Spare | None) -> None:
    """This thread's runs may put pieces on `spare` (None: they compute everything here)."""
    _local.spare = spare


def available() -> bool:
    return getattr(_local, "spare", None) is not None


class _Done(Generic[T]):
    """A call made at once, answered like a future."""

    def __init__(self, fn: Callable[..., T], *args: Any) -> None:
        self._value = fn(*args)

    def result(self) -> T:
        return self._value


def alongside(fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T] | _Done[T]:
    """`fn(*args)` on this thread's spare, to be `.result()`-ed later; with no spare, called
    now. `fn` must not touch what the caller computes meanwhile."""
    spare: Spare | None = getattr(_local, "spare", None)
    if spare is None:
        return _Done(fn, *args)
    return spare.submit(fn, *args)


K = TypeVar("K")

# Parts the spare may have made ahead of the fold: a bound on what waits in memory
AHEAD = 8


def in_order(
    keys: Sequence[K],
    compute: Callable[[K], T],
    fold: Callable[[T], None],
    check: Callable[[], None],
) -> None:
    """`fold(compute(key))` for every key, folded on this thread in the keys' order, whoever
    computed each part: this thread and the spare take the next key in turn, so a sum folded
    here adds its parts in the same order with a spare or without one. `check` (the run's
    cancel check) is called before each part this thread takes; the spare stops at a set
    token or a failed part, and makes at most AHEAD parts ahead of the fold."""
    spare_: Spare | None = getattr(_local, "spare", None)
    if spare_ is None or len(keys) < 2:
        for key in keys:
            check()
            fold(compute(key))
        return
    turns = _Turns(len(keys))

    def spare_share() -> None:
        while (i := turns.claim(ahead=AHEAD)) is not None:
            try:
                turns.made(i, compute(keys[i]))
            except BaseException as err:  # handed to the fold, raised on the run's thread
                turns.made(i, _Failed(err))
                return

    spare_.submit(spare_share)  # may start late (the spare busy): then it finds no key left
    try:
        while True:
            check()
            i = turns.claim()
            if i is None:
                break
            turns.made(i, compute(keys[i]))
            for part in turns.ready():
                fold(part)
        for part in turns.rest():
            fold(part)
    finally:
        turns.stop()


class _Failed:
    def __init__(self, err: BaseException) -> None:
        self.err = err


class _Turns:
    """The keys' indices handed out one at a time, and the parts made, given back in order."""

    def __init__(self, n: int) -> None:
        self._n = n
        self._next = 0  # the next index to hand out
        self._folded = 0  # parts handed to the fold so far
        self._made: dict[int, Any] = {}
        self._stopped = False
        self._changed = threading.Condition()

    def claim(self, ahead: int | None = None) -> int | None:
        with self._changed:
            while (
                ahead is not None
                and not self._stopped
                and self._next < self._n
                and self._next - self._folded >= ahead
            ):
                self._changed.wait()
            if self._stopped or self._next >= self._n:
                return None
            self._next += 1
            return self._next - 1

    def made(self, i: int, part: Any) -> None:
        with self._changed:
            self._made[i] = part
            self._changed.notify_all()

    def ready(self) -> list[Any]:
        """The parts made from the next unfolded index on, without a gap."""
        with self._changed:
            parts = []
            while self._folded in self._made:
                parts.append(self._made.pop(self._folded))
                self._folded += 1
            self._changed.notify_all()
        for part in parts:
            if isinstance(part, _Failed):
                raise part.err
        return parts

    def rest(self) -> list[Any]:
        """Every part still to fold, waiting for those the spare is making."""
        parts: list[Any] = []
        while True:
            parts += self.ready()
            with self._changed:
                if self._folded >= self._next:  # nothing handed out is still being made
                    self._stopped = True
                    self._changed.notify_all()
                    return parts
                if self._folded not in self._made:
                    self._changed.wait()

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
