"""POST /api/run: forward pass, manual broadcasting backward pass, check against autograd."""

from fastapi import APIRouter

from app import budget, pipeline
from app.api.responses import StrictJSONResponse
from app.schemas import RunRequest, RunResponse
from app.settings import get_settings

router = APIRouter(tags=["run"])


@router.post(
    "/api/run",
    response_model=RunResponse,
    response_class=StrictJSONResponse,
    summary="Run a network forward, backward by hand, and check against autograd",
    responses={422: {"description": "A field out of its limits, or over the memory budget"}},
)
def run(request: RunRequest | None = None) -> StrictJSONResponse:
    cfg = request or RunRequest()
    settings = get_settings()
    estimate = pipeline.estimate(cfg, settings.chunk_bytes)
    if estimate.total > settings.memory_budget_bytes:
        one_row = cfg.model_copy(update={"batch": 1})
        per_row = pipeline.estimate(one_row, settings.chunk_bytes)
        budget.refuse_over_budget(cfg, estimate, per_row, settings.memory_budget_bytes)
    return StrictJSONResponse(pipeline.run(cfg, settings.chunk_bytes))
