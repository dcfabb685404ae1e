"""POST /api/program: the learner's own network, a forward and a backward written as lines;
GET /api/programs: the worked presets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent

from app.api import sandboxed
from app.api.responses import JSON_ERROR, VALIDATION_ERROR, StrictJSONResponse
from app.api.streaming import event
from app.programs import presets
from app.programs.schemas import ProgramRequest, ProgramResponse, ProgramTrainRequest
from app.schemas import ErrorMessage

router = APIRouter(tags=["program"])


def body_schema(model: type) -> dict:
    """The route's body, for /openapi.json: the route reads it as bytes (a worker decodes and
    validates it), so FastAPI does not see the model; app/server/openapi.py adds it."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


@router.post(
    "/api/program",
    openapi_extra=body_schema(ProgramRequest),
    response_model=ProgramResponse,
    response_class=StrictJSONResponse,
    summary="Run a forward written as lines under autograd, then the learner's backward, and "
    "check every gradient it writes",
    responses={
        403: {"model": ErrorMessage, "description": "A request from another origin"},
        413: {"model": ErrorMessage, "description": "A body over 1 MiB"},
        415: {"model": ErrorMessage, "description": "A body not sent as application/json"},
        422: {
            "description": "A field out of its limits, or a line that cannot run: loc is "
            '["body", "forward" or "backward", line] (a refused construct, a forward that '
            "cannot run, memory or work over the limit, decided on meta tensors first)",
            "content": {"application/json": {"schema": {"$ref": VALIDATION_ERROR}}},
        },
        503: {
            "model": ErrorMessage,
            "description": "Busy; retry after Retry-After seconds",
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        },
    },
)
async def program(http: Request) -> Response:
    # the body is read here and decoded, validated, dry-run and run in a sandbox worker
    return await sandboxed.run_program(http)


@router.get(
    "/api/programs",
    summary="Worked programs: each a complete POST /api/program body whose backward is the "
    "solution",
)
async def program_presets() -> list[dict]:
    return presets.PRESETS


@router.post(
    "/api/program/train",
    openapi_extra=body_schema(ProgramTrainRequest),
    response_class=EventSourceResponse,
    summary="Train a program with its own backward's gradients (SGD), streamed as server-sent "
    "events",
    description="SGD over the program's inputs that have a gradient, with the gradients its "
    "backward writes (no autograd). A names program trains on random minibatches of the names "
    "data's training part (`batch` rows; its `n` follows) and is validated on the val part; "
    "any other program trains on its own inputs. Events: `step` every `report_every` steps "
    "and after the last ({step, loss (the mean since the last event), batch_loss, "
    "steps_per_s}; every `eval_every` steps also `val_loss` and, for a names program whose "
    "forward assigns `logits`, `samples`: names drawn from the network); then `done` ({steps, "
    "stopped, loss, train_loss, val_loss, trained, fixed, fixed_why, backward_error, samples, "
    "seconds}). A parameter whose gradient the backward does not write is held fixed and "
    'named in `fixed`. `stopped`: null, "time_limit" or "diverged". An error after the '
    "stream started is an `error` event ({detail}). The same request gives the same events.",
    responses={
        403: {"description": "A request from another origin", "content": JSON_ERROR},
        413: {"description": "A body over 1 MiB", "content": JSON_ERROR},
        415: {"description": "A body not sent as application/json", "content": JSON_ERROR},
        422: {
            "description": "A field out of its limits, or a line that cannot run (loc "
            '["body", "forward" or "backward", line]), at any batch size the training uses',
            "content": {"application/json": {"schema": {"$ref": VALIDATION_ERROR}}},
        },
        503: {
            "description": "Every run slot stayed busy for the queue wait",
            "content": JSON_ERROR,
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        },
    },
)
async def train(
    training: Annotated[sandboxed.Training, Depends(sandboxed.prepared_training)],
) -> AsyncIterator[ServerSentEvent]:
    # the steps run in the training's own worker process (niced, so runs come first)
    async for kind, payload in training.events():
        yield event(kind, payload)
