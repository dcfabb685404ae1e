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

import collections
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
    """Whether this thread's runs have a spare (a small lane's thread on a two-thread run)."""
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


def in_order(
    keys: Sequence[K],
    compute: Callable[[K], T],
    fold: Callable[[T], None],
    check: Callable[[], None],
    share: bool = True,
    hold: int = 1,
) -> None:
    """`fold(compute(key))` for every key, folded in the keys' order whoever computed each
    part: this thread and the spare take the next key in turn, and the thread that made a part
    folds it once the part before is folded, so a sum adds its parts in the same order with a
    spare or without one. Memory a thread allocates is freed by that thread, in the order it
    came (parts handed across threads fragmented the allocator's heaps: 4 MiB products left
    60-100 MB behind). A thread may hold up to `hold` parts made and not yet folded, and
    takes the next key meanwhile: with one, the two threads go in lockstep, each as slow as
    the slower (a core shared with another process: the run's half there at half speed);
    with a few small parts held (a broadcast's (in, out) shares), the faster takes more keys.
    `check` (the run's cancel check) is called before each part this thread takes; the spare
    stops at a failed part or once this thread stops. `share=False`: all on this thread."""
    spare_: Spare | None = getattr(_local, "spare", None) if share else None
    if spare_ is None or len(keys) < 2:
        for key in keys:
            check()
            fold(compute(key))
        return
    turns = _Turns(len(keys))

    def take_turns(before_each: Callable[[], None]) -> None:
        held: collections.deque[tuple[int, T]] = collections.deque()  # made here, in order
        keys_left = True
        try:
            while True:
                # fold what is this thread's turn; wait for a turn only with no room left, or
                # no key left to take meanwhile
                while held and (not keys_left or len(held) >= hold or turns.is_turn(held[0][0])):
                    if not turns.wait_for(held[0][0]):
                        return  # stopped: the other thread failed
                    i, part = held.popleft()
                    try:
                        fold(part)
                    finally:
                        del part
                        turns.folded(i)
                if not keys_left:
                    return
                before_each()
                i = turns.claim()
                if i is None:
                    keys_left = False
                else:
                    held.append((i, compute(keys[i])))
        finally:
            held.clear()  # (stopped: what is left is this thread's to free)

    def spare_share() -> None:
        try:
            take_turns(lambda: None)
        except BaseException as err:  # raised on the run's thread, at its next turn
            turns.fail(err)

    spare_.submit(spare_share)  # may start late (the spare busy): then it finds no key left
    try:
        take_turns(check)
        turns.wait_all()
    finally:
        turns.stop()


class _Turns:
    """The keys' indices handed out one at a time, and whose turn it is to fold."""

    def __init__(self, n: int) -> None:
        self._n = n
        self._next = 0  # the next index to hand out
        self._done = 0  # parts folded so far: the index whose turn it is
        self._failed: BaseException | None = None
        self._stopped = False
        self._changed = threading.Condition()

    def claim(self) -> int | None:
        with self._changed:
            self._raise_failure()
            if self._stopped or self._next >= self._n:
                return None
            self._next += 1
            return self._next - 1

    def is_turn(self, i: int) -> bool:
        """Whether part `i` may be folded now (every part before it is)."""
        with self._changed:
            return self._done >= i

    def wait_for(self, i: int) -> bool:
        """Wait for part `i`'s turn to fold; False if stopped meanwhile."""
        with self._changed:
            while self._done < i and not self._stopped and self._failed is None:
                self._changed.wait()
            self._raise_failure()
            return not self._stopped

    def folded(self, i: int) -> None:
        with self._changed:
            self._done = i + 1
            self._changed.notify_all()

    def wait_all(self) -> None:
        """Until every part handed out is folded (the spare may still be folding one)."""
        with self._changed:
            while self._done < self._next and self._failed is None:
                self._changed.wait()
            self._raise_failure()

    def fail(self, err: BaseException) -> None:
        with self._changed:
            self._failed = err
            self._changed.notify_all()

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify_all()

    def _raise_failure(self) -> None:
        if self._failed is not None:  # only the spare fails here, and it has stopped by then
            raise self._failed
