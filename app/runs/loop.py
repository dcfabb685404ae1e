"""The one training loop: steps, stop reasons, the time limit, the report and evaluation
cadence and divergence, for both trainers (app/runs/train.py over a Network,
app/programs/train.py over a learner's program). A trainer supplies what a step computes,
what it updates and what an event says (`Steps`); the loop decides when.

Each step: stop before it if asked or out of time; run it (its loss); count it; let the
trainer look at the weights the step's gradients are for (`before_update`); update when the
loss is finite; report at step 1, every `report_every` and `eval_every` steps, at the last and
at a loss that is not finite; stop after a loss that is not finite ("diverged").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol


class Stop(Exception):
    """The training ends here: `reason` is what its done event says ("stopped",
    "step_deadline")."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Failed(Exception):
    """The training cannot go on: an ("error", {"detail": ...}) event, and no done event."""


@dataclass
class Cadence:
    """When a training reports: the step, whether it is an evaluation step, and whether its
    loss is finite."""

    step: int
    evaluate: bool
    finite: bool


class Steps(Protocol):
    """What a trainer supplies to the loop."""

    def step(self, number: int) -> float:
        """Run step `number` (forward and backward, no update): its loss. Raise `Stop` or
        `Failed` to end the training."""

    def before_update(self, step: int, reporting: bool) -> None:
        """After step `step` is counted, before the update (`reporting`: this step reports)."""

    def update(self) -> None:
        """Apply the step's gradients (only after a finite loss)."""

    def report(self, cadence: Cadence, loss: float | None, batch_loss: float | None) -> dict:
        """The step's event: `loss` is the mean since the last event, `batch_loss` the
        step's own (None when not finite). Raise `Stop` to end the training unreported."""


@dataclass
class Outcome:
    """How far a training got: steps run, why it stopped early (None: it ran them all), and
    the last step's loss."""

    steps: int
    stopped: str | None
    last_loss: float


def stop_reason(
    should_stop: Callable[[], bool], start: float, time_limit_s: float | None
) -> str | None:
    """Why a training stops before its next step: "stopped" (asked: its client went away),
    "time_limit" (BROADPROP_TRAIN_TIME_LIMIT_S passed since `start`), or None to go on."""
    if should_stop():
        return "stopped"
    if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
        return "time_limit"
    return None


def loop(
    trainer: Steps,
    steps: int,
    *,
    start: float,
    report_every: int,
    eval_every: int,
    should_stop: Callable[[], bool],
    time_limit_s: float | None,
    kind: str,
    between: bool = False,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (`kind`, event) at each report and, with `between`, ("step", {"step": n}) after
    every other step (so that a caller may pause between any two steps); return the
    `Outcome`, or None after a `Failed` (its "error" event yielded)."""
    step, stopped, loss_sum, since, last = 0, None, 0.0, 0, math.nan
    while step < steps:
        stopped = stop_reason(should_stop, start, time_limit_s)
        if stopped:
            break
        try:
            loss = trainer.step(step + 1)
        except Stop as stop:
            stopped = stop.reason
            break
        except Failed as failed:
            yield "error", {"detail": str(failed)}
            return None
        step += 1
        last = loss
        loss_sum, since = loss_sum + loss, since + 1
        finite = math.isfinite(loss)
        last_step = step == steps
        evaluate = step == 1 or step % eval_every == 0 or last_step
        reporting = evaluate or step % report_every == 0 or not finite
        try:
            trainer.before_update(step, reporting)
        except Stop as stop:
            stopped = stop.reason
            break
        if finite:
            trainer.update()
        if reporting:
            mean = finite_or_none(loss_sum / since)
            loss_sum, since = 0.0, 0
            try:
                event = trainer.report(Cadence(step, evaluate, finite), mean, finite_or_none(loss))
            except Stop as stop:
                stopped = stop.reason
                break
            yield kind, event
        elif between:
            yield "step", {"step": step}
        if not finite:
            stopped = "diverged"
            break
    return Outcome(step, stopped, last)


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
