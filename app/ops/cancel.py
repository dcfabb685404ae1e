"""Stopping a run at its deadline: the run's cancel token, reachable from every op."""

from __future__ import annotations

import contextvars
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


def check_cancelled() -> None:
    """Raise RunCancelled if the current run's token (see `cancel_token`) is set; else nothing.
    Cheap: called after every op computed on real tensors."""
    token = _CANCEL.get()
    if token is not None and token.is_set():
        raise RunCancelled("the run was stopped")
