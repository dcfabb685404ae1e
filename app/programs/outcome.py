"""One pass of a program over real tensors, as the check, the hints and the views read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

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
