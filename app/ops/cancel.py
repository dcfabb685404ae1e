"""Stopping a run at its deadline (the run's cancel token, reachable from every op), and
telling its memory limit's failure from a formula's."""

from __future__ import annotations

import contextvars
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class RunCancelled(Exception):
    """Raised by `Context.check` and `check_cancelled` once the run's cancel token is set."""


# The cancel token (anything with `is_set()`) of the run this thread is computing, so that code
# far below the pipeline (every op of a learner's formula, an interpreter between statements)
# can stop at the deadline without the token being passed down to it.
_CANCEL: contextvars.ContextVar[Any] = contextvars.ContextVar("broadprop_cancel", default=None)


@contextmanager
def cancel_token(token: Any) -> Iterator[None]:
    """`with cancel_token(token):` makes `token` the current run's, for `check_cancelled`."""
    reset = _CANCEL.set(token)
    try:
        yield
    finally:
        _CANCEL.reset(reset)


def current_token() -> Any:
    """The current run's token (see `cancel_token`), or None."""
    return _CANCEL.get()


class FlagOnly:
    """A token seen from a thread that is not the run's (app/ops/spare.py): `is_set()` reads
    the flag only, so that thread's polls never start or read the deadline's clock."""

    def __init__(self, token: Any) -> None:
        self._token = token

    def is_set(self) -> bool:
        was_set = getattr(self._token, "was_set", None)
        return was_set() if was_set is not None else self._token.is_set()


def check_cancelled() -> None:
    """Raise RunCancelled if the current run's token (see `cancel_token`) is set; else nothing.
    Cheap: called after every op computed on real tensors."""
    token = _CANCEL.get()
    if token is not None and token.is_set():
        raise RunCancelled("the run was stopped")


CPU_READ_EVERY_S = 0.001


class CancelToken:
    """Set by the limiter when a run should stop; the run polls `is_set()` between its ops and
    chunks (app.ops.Context.cancel) and raises there.

    Armed with a deadline (`arm`), the token also turns set once the polling thread has used
    that much CPU time since its first poll: the run's own work, what it would take on a quiet
    machine, so that a machine busy with other work (a room of browsers on the same laptop)
    does not stop runs that are within bounds."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None
        self.cpu_deadline_s = math.inf
        self._cpu_start: float | None = None
        self._cpu_thread: int | None = None  # the run's thread: the only clock that counts
        self._lent_s = 0.0  # CPU time the run's pieces took on a spare thread (`lend`)
        self._next_read = 0.0  # monotonic time before which the CPU clock is not read again

    def arm(self, cpu_deadline_s: float) -> None:
        self.cpu_deadline_s = cpu_deadline_s

    def lend(self, cpu_s: float) -> None:
        """Count `cpu_s` of another thread's CPU time (a piece of this run computed on a spare,
        app/ops/spare.py) toward the deadline."""
        self._lent_s += cpu_s

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        """Set, or (polled from the run's own thread) past its CPU deadline. The CPU clock is
        the first polling thread's: a poll from any other thread (the event loop's, whose CPU
        time is the whole server's) only reads the flag, so it can never turn a run's own
        error into a false "deadline"."""
        if self._event.is_set():
            return True
        if self.cpu_deadline_s < math.inf:
            here = threading.get_ident()
            if self._cpu_thread is None:
                self._cpu_thread, self._cpu_start = here, time.thread_time()
            elif here == self._cpu_thread and time.monotonic() >= self._next_read:
                # the CPU clock is a system call (~0.6 us), polled after every op: read it at
                # most once a millisecond, so a run stops at most ~1 ms past its deadline
                self._next_read = time.monotonic() + CPU_READ_EVERY_S
                if self._used_s() > self.cpu_deadline_s:
                    self.set("deadline")
                    return True
        return False

    def _used_s(self) -> float:
        """The run thread's CPU time since its first poll, and what spares lent."""
        return time.thread_time() - self._cpu_start + self._lent_s  # type: ignore[operator]

    def was_set(self) -> bool:
        """Whether the token was set (by the limiter, a client gone, or a deadline the run's
        thread saw), without polling any clock: for threads other than the run's."""
        return self._event.is_set()


def is_allocation_failure(err: BaseException) -> bool:
    """torch's allocator refused (a hard memory limit reached): "DefaultCPUAllocator: can't
    allocate memory"."""
    text = str(err)
    return "can't allocate memory" in text or "DefaultCPUAllocator" in text
