"""POST /api/program: the learner's own network, a forward and a backward written as lines;
GET /api/programs: the worked presets."""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent

from app.api.responses import JSON_ERROR, VALIDATION_ERROR, StrictJSONResponse
from app.api.streaming import event, iterate_in_slices
from app.cost.admission import admit_program, admit_program_watched, refuse_program
from app.lab.statements import ProgramError
from app.ops.cancel import CancelToken
from app.programs import presets
from app.programs import run as programs
from app.programs import train as training
from app.programs.schemas import ProgramRequest, ProgramResponse, ProgramTrainRequest
from app.schemas import ErrorMessage
from app.server.errors import guarded
from app.server.lanes import TRAIN_SLICE_S
from app.settings import Settings

router = APIRouter(tags=["program"])
DRY_RUN_INLINE_CHARS = 1500  # shorter programs (an exercise's few lines) dry-run inline


@router.post(
    "/api/program",
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
async def program(http: Request, request: ProgramRequest) -> StrictJSONResponse:
    settings: Settings = http.app.state.settings
    if len(request.forward) + len(request.backward) <= DRY_RUN_INLINE_CHARS:
        plan = await anyio.to_thread.run_sync(admit_program, request, settings)
    else:  # a long program's dry run takes the dry-run lane, under the run deadline
        watch = CancelToken()
        plan = await http.app.state.limiter.dry_run(
            admit_program_watched, request, settings, watch, cancel=watch, receive=http.receive
        )
    cancel = CancelToken()
    return await http.app.state.limiter.run(
        guarded(_execute, settings),
        request,
        plan,
        cancel,
        work_s=plan.seconds,
        cancel=cancel,
        receive=http.receive,
        memory_bytes=plan.bytes,
    )


def _execute(request: ProgramRequest, plan: programs.Plan, cancel: CancelToken):
    try:
        return StrictJSONResponse(programs.run(request, plan, cancel))
    except ProgramError as err:  # the forward failed on real data (an index out of range)
        refuse_program(programs.ProgramRefused("forward", err.line, str(err), err.kind))


@router.get(
    "/api/programs",
    summary="Worked programs: each a complete POST /api/program body whose backward is the "
    "solution",
)
async def program_presets() -> list[dict]:
    return presets.PRESETS


def prepare(request: ProgramTrainRequest, settings: Settings) -> training.Setup:
    """Every dry run the training needs (the step's, the val pass's, sampling's): a 422 at
    the line for anything refused, before the stream starts."""
    return training.prepare(
        request.program,
        steps=request.steps,
        batch=request.batch,
        lr=request.lr,
        seed=request.seed,
        eval_every=request.eval_every,
        report_every=request.report_every,
        admit=lambda req: admit_program(req, settings),
    )


async def checked(http: Request, request: ProgramTrainRequest) -> training.Setup:
    return await anyio.to_thread.run_sync(prepare, request, http.app.state.settings)


@router.post(
    "/api/program/train",
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
    http: Request,
    setup: Annotated[training.Setup, Depends(checked)],
) -> AsyncIterator[ServerSentEvent]:
    settings: Settings = http.app.state.settings
    stop = threading.Event()
    events = training.train(setup, stop.is_set, settings.train_time_limit_s)
    # as /api/train: the steps run in slices, each on a run slot taken for it and given back
    # after, so a waiting run gets a slot within one slice
    slices = functools.partial(http.app.state.limiter.slot, None, math.inf)
    try:
        async for kind, payload in iterate_in_slices(events, stop, slices, TRAIN_SLICE_S):
            yield event(kind, payload)
    except (MemoryError, RuntimeError, ValueError) as e:  # the stream has started: an event
        yield event("error", {"detail": f"training failed: {type(e).__name__}: {e}"})
    finally:
        stop.set()
