"""One pass of a program over real tensors, as the check, the hints and the views read it."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import torch

from app.lab.allowlist import FormulaError
from app.lab.statements import ProgramError


@dataclass
class Outcome:
    """One pass over real tensors: the forward's values, autograd's gradients, the
    learner's, and where the backward stopped."""

    inputs: dict[str, Any]
    forward: dict[str, Any]
    loss: float
    autograd: dict[str, torch.Tensor]
    manual: dict[str, torch.Tensor]
    lines: dict[str, list[int]]
    spelling: dict[str, str]
    helpers: dict[str, Any]
    error: ProgramError | None
    # each gradient's rounding noise where no float64 rerun of the forward exists (the
    # notebook: its forward ran in the kernel, so only the backward is rerun in float64)
    rounding: dict[str, float] | None = None
    dropped: dict[str, torch.Tensor] = field(default_factory=dict)  # see BackwardRun.dropped


# --------------------------------------------------------------------------- a rerun sent over


def rerun_payload(outcome: Outcome) -> bytes | None:
    """What a program's check reads of its float64 rerun (app/programs/check.py): the
    gradients the backward wrote, autograd's of the same tensors, the lines that wrote them
    and where the backward stopped; as bytes for another process (plain pickle over numpy
    arrays: no tensor sharing, no file descriptors). None when a value cannot travel so."""
    try:
        arrays = {
            "manual": {n: t.detach().numpy() for n, t in outcome.manual.items()},
            "autograd": {
                n: outcome.autograd[n].numpy() for n in outcome.manual if n in outcome.autograd
            },  # fmt: skip
        }
    except (TypeError, RuntimeError):  # a dtype numpy lacks
        return None
    error = outcome.error
    stop = None if error is None else (str(error), error.kind, error.details, error.line,
                                       error.code)  # fmt: skip
    return pickle.dumps({**arrays, "lines": outcome.lines, "error": stop, "loss": outcome.loss},
                        protocol=pickle.HIGHEST_PROTOCOL)  # fmt: skip


def outcome_of_payload(payload: bytes) -> Outcome:
    """`rerun_payload`'s outcome, with what the check does not read of a rerun left empty."""
    sent = pickle.loads(payload)  # (from our own sandbox worker, through its pipe)
    error = None
    if sent["error"] is not None:
        message, kind, details, line, code = sent["error"]
        error = ProgramError(FormulaError(message, kind, **details), line, code)
    return Outcome(
        inputs={},
        forward={},
        loss=sent["loss"],
        autograd={n: torch.from_numpy(a) for n, a in sent["autograd"].items()},
        manual={n: torch.from_numpy(a) for n, a in sent["manual"].items()},
        lines=sent["lines"],
        spelling={},
        helpers={},
        error=error,
    )
