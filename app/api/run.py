"""POST /api/run: forward pass, manual broadcasting backward pass, check against autograd."""

import anyio
from fastapi import APIRouter, Request

from app.api.responses import StrictJSONResponse
from app.cost import budget, work
from app.engine import network, pipeline
from app.lab import formulas
from app.lab.evaluator import FormulaError
from app.lab.formulas import UnknownGradient
from app.schemas import ErrorMessage, RunRequest, RunResponse
from app.server.errors import guarded
from app.server.lanes import CancelToken
from app.settings import Settings
from app.views import follow

router = APIRouter(tags=["run"])
VALIDATION_ERROR = "#/components/schemas/HTTPValidationError"  # FastAPI's own 422 body


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
    # refused before waiting for a run slot
    seconds, nbytes = await checked_budget(http, request)
    cancel = CancelToken()
    execute = guarded(_execute, settings)
    return await http.app.state.limiter.run(
        execute,
        request,
        settings.chunk_bytes,
        cancel,
        work_s=seconds,
        cancel=cancel,
        receive=http.receive,
        memory_bytes=nbytes,
    )


async def checked_budget(http: Request, cfg: RunRequest) -> tuple[float, int]:
    """`check_budget`, off the event loop. Shapes only: cheap, on any thread; but a long dry
    run of the learner's formulas (estimated from their length: `work.dry_run_s`) takes the
    dry-run lane's one slot, with the run deadline, and steps aside for the runs in flight
    between two formulas (app/server/lanes.py, RunLimiter.pacer)."""
    settings: Settings = http.app.state.settings
    if work.dry_run_s(cfg) <= work.DRY_RUN_INLINE_S:
        return await anyio.to_thread.run_sync(check_budget, cfg, settings)
    limiter = http.app.state.limiter
    cancel = CancelToken()
    pacing = network.PACE.set(limiter.pacer(cancel))  # copied into the lane's job
    try:
        return await limiter.dry_run(
            check_budget, cfg, settings, cancel=cancel, receive=http.receive
        )
    finally:
        network.PACE.reset(pacing)


def check_budget(cfg: RunRequest, settings: Settings) -> tuple[float, int]:
    """422 naming the field and the limit when the run would not fit in memory or would hold
    a run slot for too long (decided from shapes: nothing allocated). The learner's formulas
    are dry-run here, on meta tensors. Returns the estimated seconds (without the rounding
    recheck, which only a failing check runs: they choose the run's lane) and bytes."""
    try:
        _, backward = pipeline.trace(cfg)
    except (FormulaError, UnknownGradient) as err:
        formulas.refuse(err, cfg.formulas)
    follow.refuse(cfg, backward)
    budget.refuse_formula_cost(cfg, backward, settings.memory_budget_bytes)
    estimate = pipeline.estimate(cfg, settings.chunk_bytes)
    if estimate.total > settings.memory_budget_bytes:
        one_row = cfg.model_copy(update={"batch": 1})
        per_row = pipeline.estimate(one_row, settings.chunk_bytes)
        budget.refuse_over_budget(cfg, estimate, per_row, settings.memory_budget_bytes)
    budget.refuse_too_much_work(cfg, settings.chunk_bytes)
    seconds = work.estimate(cfg, settings.chunk_bytes)
    return seconds.total - seconds.recheck, estimate.total


def _execute(cfg: RunRequest, chunk_bytes: int, cancel: CancelToken) -> StrictJSONResponse:
    """The run and its JSON rendering, both in the worker thread. A formula that passed the
    dry run and fails on the real numbers (`F.one_hot(-target, 3)`) is a 422 at its key."""
    try:
        return StrictJSONResponse(pipeline.run(cfg, chunk_bytes, cancel))
    except FormulaError as err:
        formulas.refuse(err, cfg.formulas)
