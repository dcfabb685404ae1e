"""POST /api/train: SGD with the manual gradients, streamed as server-sent events."""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent

from app.api import gate
from app.api.responses import JSON_ERROR, VALIDATION_ERROR
from app.api.streaming import event, iterate_in_slices
from app.ops.cancel import CancelToken
from app.runs import train as training
from app.schemas import TrainRequest
from app.server.lanes import TRAIN_SLICE_S
from app.settings import Settings

router = APIRouter(tags=["train"])


async def checked(http: Request, request: TrainRequest | None = None) -> TrainRequest:
    """The request, refused with a 422 before the stream when a step would not fit in the
    memory budget (a step's minibatch or the validation pass, whichever is larger)."""
    cfg = request or TrainRequest()
    n = training.n_examples(cfg)
    widest = cfg.model_copy(update={"batch": max(cfg.train_batch, n // 5)})
    await gate.admitted(http, widest)
    return cfg


async def training_place(http: Request) -> AsyncIterator[None]:
    """A training's place for the whole stream, and a run slot free within the queue wait
    (503 before the stream otherwise); the stream then takes a slot for each slice of its
    steps (app.api.streaming), so runs and other trainings take turns with it."""
    limiter = http.app.state.limiter
    async with limiter.training():
        async with limiter.slot():
            pass
        yield


@router.post(
    "/api/train",
    response_class=EventSourceResponse,
    summary="Train with the manual gradients (SGD + momentum), streamed as server-sent events",
    description="Events: `progress` after the first step, every `eval_every` steps and "
    "after the last ({step, loss, batch_loss, val_loss, val_accuracy, grad_norms, "
    "max_rel_err, all_close, steps_per_s}); then `done` ({steps, stopped, val_loss, "
    "val_accuracy, seconds, weights: {w1}, weights_before: {w1}}; with image data w1 also "
    'has `images`, one per hidden unit). `stopped` is null, "time_limit" '
    '(BROADPROP_TRAIN_TIME_LIMIT_S), "diverged" (a loss that is not finite), "stopped" or '
    '"step_deadline" (one step over BROADPROP_RUN_DEADLINE_S). A training takes turns on a '
    "run slot with runs and other trainings, a slice of steps at a time (at most two "
    "trainings per slot at once). An error after the stream started is an `error` event "
    "({detail}).",
    responses={
        403: {"description": "A request from another origin", "content": JSON_ERROR},
        413: {"description": "A body over BROADPROP_MAX_BODY_BYTES", "content": JSON_ERROR},
        415: {"description": "A body not sent as application/json", "content": JSON_ERROR},
        422: {
            "description": "A field out of its limits, or a step over the memory budget",
            "content": {"application/json": {"schema": {"$ref": VALIDATION_ERROR}}},
        },
        503: {
            "description": "Every run slot stayed busy for the queue wait, or the server "
            "trains as many networks at once as it may",
            "content": JSON_ERROR,
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        },
    },
)
async def train(
    http: Request,
    cfg: Annotated[TrainRequest, Depends(checked)],
    place: Annotated[None, Depends(training_place)],
) -> AsyncIterator[ServerSentEvent]:
    settings: Settings = http.app.state.settings
    limiter = http.app.state.limiter
    stop = threading.Event()

    def step_cancel() -> CancelToken:  # each step's ops count against the run deadline
        token = CancelToken()
        token.arm(settings.run_deadline_s)
        return token

    events = training.train(
        cfg,
        settings.chunk_bytes,
        stop.is_set,
        settings.train_time_limit_s,
        step_cancel=step_cancel,
        every_step=True,
    )
    # once started, a stream waits for its next slice as long as it takes (runs are bounded)
    slices = functools.partial(limiter.slot, None, math.inf)
    try:
        async for kind, payload in iterate_in_slices(
            events, stop, slices, TRAIN_SLICE_S, skip=lambda item: item[0] == "step"
        ):
            yield event(kind, payload)
    except (MemoryError, RuntimeError, ValueError) as e:  # the stream has started: an event
        yield event("error", {"detail": f"training failed: {type(e).__name__}: {e}"})
    finally:
        stop.set()
