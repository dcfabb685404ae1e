"""POST /api/run: forward pass, manual broadcasting backward pass, check against autograd."""

from fastapi import APIRouter, Request

from app.api import gate
from app.api.responses import VALIDATION_ERROR, StrictJSONResponse
from app.lab import formulas
from app.lab.allowlist import FormulaError
from app.ops.cancel import CancelToken
from app.runs import pipeline
from app.runs.pipeline import Traces
from app.schemas import ErrorMessage, RunRequest, RunResponse
from app.server.errors import guarded
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


def _execute(
    cfg: RunRequest, chunk_bytes: int, cancel: CancelToken, traces: Traces
) -> StrictJSONResponse:
    """The run and its JSON rendering, both in the worker thread. A formula that passed the
    dry run and fails on the real numbers (`F.one_hot(-target, 3)`) is a 422 at its key."""
    try:
        return StrictJSONResponse(pipeline.run(cfg, chunk_bytes, cancel, traces))
    except FormulaError as err:
        formulas.refuse(err, cfg.formulas)
