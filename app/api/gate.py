"""The HTTP side of admission: the cost gate (app/cost/admission.py) run off the event loop,
in the lane its dry run needs."""

from __future__ import annotations

import anyio
from fastapi import Request

from app.cost import admission
from app.cost.admission import Admitted
from app.cost.work import DRY_RUN_INLINE_S, dry_run_s
from app.engine import network
from app.ops.cancel import CancelToken


async def admitted(http: Request, cfg) -> Admitted:
    """`admit`, off the event loop. Shapes only: cheap, on any thread; but a long dry run of
    the learner's formulas (estimated from their length: `work.dry_run_s`) takes the dry-run
    lane's one slot, with the run deadline, and steps aside for the runs in flight between
    two formulas (app/server/lanes.py, RunLimiter.pacer)."""
    settings = http.app.state.settings
    if dry_run_s(cfg) <= DRY_RUN_INLINE_S:
        return await anyio.to_thread.run_sync(admission.admit, cfg, settings)
    limiter = http.app.state.limiter
    cancel = CancelToken()
    pacing = network.PACE.set(limiter.pacer(cancel))  # copied into the lane's job
    try:
        return await limiter.dry_run(
            admission.admit, cfg, settings, cancel=cancel, receive=http.receive
        )
    finally:
        network.PACE.reset(pacing)
