"""POST /api/run: forward pass, manual broadcasting backward pass, check against autograd."""

import anyio
from fastapi import APIRouter, Request

from app import budget, hardening, pipeline
from app.api.responses import StrictJSONResponse
from app.lab import formulas
from app.lab.evaluator import FormulaError
from app.lab.formulas import UnknownGradient
from app.schemas import ErrorMessage, RunRequest, RunResponse
from app.settings import Settings

router = APIRouter(tags=["run"])
VALIDATION_ERROR = "#/components/schemas/HTTPValidationError"  # FastAPI's own 422 body


@router.post(
    "/api/run",
    response_model=RunResponse,
    response_class=StrictJSONResponse,
    summary="Run a network forward, backward by hand, and check against autograd",
    responses={
        413: {"model": ErrorMessage, "description": "A body over BROADPROP_MAX_BODY_BYTES"},
        422: {
            "description": "A field out of its limits, or a config over the memory budget or "
            "the work limits (the literal broadcast form, finite differences)",
            "content": {"application/json": {"schema": {"$ref": VALIDATION_ERROR}}},
        },
        503: {
            "model": ErrorMessage,
            "description": "Every run slot stayed busy for the queue wait, or the server ran "
            "out of memory; retry after Retry-After seconds",
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        },
    },
)
async def run(http: Request, request: RunRequest | None = None) -> StrictJSONResponse:
    cfg = request or RunRequest()
    settings: Settings = http.app.state.settings
    # shapes only (cheap), but off the event loop; refused before waiting for a run slot
    await anyio.to_thread.run_sync(check_budget, cfg, settings)
    execute = hardening.guarded(_execute, settings)
    return await http.app.state.limiter.run(execute, cfg, settings.chunk_bytes)


def check_budget(cfg: RunRequest, settings: Settings) -> None:
    """422 naming the field and the limit when the run would not fit in memory or would hold
    a run slot for too long (decided from shapes: nothing allocated). The learner's formulas
    are dry-run here, on meta tensors."""
    try:
        _, backward = pipeline.trace(cfg)
    except (FormulaError, UnknownGradient) as err:
        formulas.refuse(err, cfg.formulas)
    budget.refuse_formula_cost(cfg, backward, settings.memory_budget_bytes)
    estimate = pipeline.estimate(cfg, settings.chunk_bytes)
    if estimate.total > settings.memory_budget_bytes:
        one_row = cfg.model_copy(update={"batch": 1})
        per_row = pipeline.estimate(one_row, settings.chunk_bytes)
        budget.refuse_over_budget(cfg, estimate, per_row, settings.memory_budget_bytes)
    budget.refuse_too_much_work(cfg)


def _execute(cfg: RunRequest, chunk_bytes: int) -> StrictJSONResponse:
    """The run and its JSON rendering, both in the worker thread."""
    return StrictJSONResponse(pipeline.run(cfg, chunk_bytes))
