"""POST /api/run: forward pass, manual broadcasting backward pass, check against autograd."""

import time
from collections.abc import Callable

from fastapi import APIRouter, Request

from app.api import gate
from app.api.responses import VALIDATION_ERROR, StrictJSONResponse
from app.cost.work import DRY_RUN_INLINE_S, interpret_s
from app.engine import network
from app.lab import formulas
from app.lab.allowlist import FormulaError
from app.ops.cancel import CancelToken
from app.runs import pipeline
from app.runs.pipeline import Traces
from app.schemas import ErrorMessage, RunRequest, RunResponse
from app.server.errors import guarded
from app.server.lanes import PACE_POLL_S, PACE_YIELD_S, SMALL_RUN_S
from app.settings import Settings

router = APIRouter(tags=["run"])


@router.post(
    "/api/run",
    response_model=RunResponse,
    response_class=StrictJSONResponse,
    summary="Run a network forward, backward by hand, and check against autograd",
    responses={
        403: {"model": ErrorMessage, "description": "A request from another origin"},
        413: {"model": ErrorMessage, "description": "A body over BROADPROP_MAX_BODY_BYTES"},
        415: {"model": ErrorMessage, "description": "A body not sent as application/json"},
        422: {
            "description": "A field out of its limits; a body that is not one JSON object; a "
            "config over the memory budget or the work limit (every pass the run would make "
            "counted), or a run stopped at its deadline (BROADPROP_RUN_DEADLINE_S)",
            "content": {"application/json": {"schema": {"$ref": VALIDATION_ERROR}}},
        },
        503: {
            "model": ErrorMessage,
            "description": "Every run slot stayed busy for the queue wait, the server ran "
            "out of memory, or it was too busy to give an in-bounds run its time; retry after "
            "Retry-After seconds",
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        },
    },
)
async def run(http: Request, request: RunRequest) -> StrictJSONResponse:
    settings: Settings = http.app.state.settings
    admitted = await gate.admitted(http, request)  # refused before waiting for a slot
    cancel = CancelToken()
    execute = guarded(_execute, settings)
    light = admitted.seconds <= SMALL_RUN_S
    pacing = None
    if interpret_s(request) > DRY_RUN_INLINE_S:  # long formulas: Python that holds the GIL
        pacing = network.PACE.set(_steps_aside(cancel))  # copied into the lane's job
    Light.in_flight += light
    try:
        return await http.app.state.limiter.run(
            execute,
            request,
            settings.chunk_bytes,
            cancel,
            admitted.traces,
            work_s=admitted.seconds,
            cancel=cancel,
            receive=http.receive,
            memory_bytes=admitted.bytes,
        )
    finally:
        Light.in_flight -= light
        if pacing is not None:
            network.PACE.reset(pacing)


class Light:
    """Light runs (the small lane's) waiting or running now: counted on the event loop, read
    by a run of long formulas between two of them (`_steps_aside`)."""

    in_flight = 0


def _steps_aside(cancel: CancelToken) -> Callable[[], None]:
    """What a run of long formulas calls between two of them (app.engine.network.PACE): while
    a light run is in flight, a sleep (the GIL free) of up to PACE_YIELD_S. A light run needs
    the GIL between each of its ops; beside a thread that interprets formulas it waited up to
    the switch interval (5 ms) for each, ~20x its time alone. The deadline counts CPU time,
    so the sleep costs the long run none of it."""

    def pace() -> None:
        waited = 0.0
        while Light.in_flight and waited < PACE_YIELD_S and not cancel.is_set():
            time.sleep(PACE_POLL_S)
            waited += PACE_POLL_S

    return pace


def _execute(
    cfg: RunRequest, chunk_bytes: int, cancel: CancelToken, traces: Traces
) -> StrictJSONResponse:
    """The run and its JSON rendering, both in the worker thread. A formula that passed the
    dry run and fails on the real numbers (`F.one_hot(-target, 3)`) is a 422 at its key."""
    try:
        return StrictJSONResponse(pipeline.run(cfg, chunk_bytes, cancel, traces))
    except FormulaError as err:
        formulas.refuse(err, cfg.formulas)
