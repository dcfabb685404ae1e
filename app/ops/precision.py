"""What `.float()` and `.to(torch.float32)` make in a learner's formula: float32, except in a
program's float64 recheck (app/programs/run.py), which reruns the same formulas in float64
throughout, so a line that pins float32 and then meets a float64 operand (`@` refuses mixed
dtypes) reruns too."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_SINGLE: contextvars.ContextVar[torch.dtype] = contextvars.ContextVar(
    "broadprop_single", default=torch.float32
)


@contextmanager
def single_precision_as(dtype: torch.dtype) -> Iterator[None]:
    """`.float()` and `.to(torch.float32)` make `dtype` within (the float64 recheck's)."""
    token = _SINGLE.set(dtype)
    try:
        yield
    finally:
        _SINGLE.reset(token)


def single_precision() -> torch.dtype:
    """The dtype `.float()` makes here."""
    return _SINGLE.get()
