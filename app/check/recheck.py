"""The one rule for the rounding recheck, and the one measure of bytes it weighs.

A run whose check fails runs both sides again in the other precision
(app/check/autograd.py `recheck_rounding`) when its tensors and manual gradients fit in
RECHECK_MAX_BYTES. Those bytes are weighed once, from shapes (`held_bytes`): the costs
(app/cost/plan.py) count the recheck from the same number the run decides by, and the
exported file carries the decision rather than weighing again.
"""

from __future__ import annotations

import math

from app.engine.tensors import input_specs

RECHECK_MAX_BYTES = 64 << 20  # runs whose inputs and gradients fit in this get the recheck


def gets_recheck(held_bytes: int) -> bool:
    """Whether a run whose inputs and gradients hold `held_bytes` reruns a failing check in
    the other precision. Only a failing check runs it; the costs count it for every such run."""
    return held_bytes <= RECHECK_MAX_BYTES


def held_bytes(cfg, forward: list[dict]) -> int:
    """Bytes of a run's tensors (x, target, the parameters; an integer target at 8) and of its
    manual gradients (every float input's and every forward output's but the loss's), from
    the config and the forward trace's shapes alone."""
    itemsize = 8 if cfg.dtype == "float64" else 4
    specs = input_specs(cfg)
    inputs = sum(math.prod(s.shape) * (8 if s.integer else itemsize) for s in specs)
    float_inputs = sum(math.prod(s.shape) * itemsize for s in specs if s.role != "target")
    outputs = sum(math.prod(e["shape"]) * itemsize for e in forward if e["output"] != "loss")
    return inputs + float_inputs + outputs


def recheck_of(cfg, forward: list[dict]) -> bool:
    """The rule applied to a run of `cfg` with this forward trace."""
    return gets_recheck(held_bytes(cfg, forward))
