"""Keeping the server up under abuse and load: a body-size limit, a bounded run limiter sized
to the machine, and errors mapped to 4xx/503 (never 500).

`install(app)` wires it all into an app built by `create_app()`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import schemas
from app.api.responses import StrictJSONResponse
from app.settings import Settings

log = logging.getLogger("broadprop")
T = TypeVar("T")


# --- concurrency -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Concurrency:
    runs: int  # heavy runs at once
    torch_threads: int  # intra-op threads each run may use; runs * threads <= cores


def derive_concurrency(settings: Settings, cores: int | None = None) -> Concurrency:
    """Fill in the 0s (derive) of max_concurrent_runs and torch_threads from the core count,
    so that runs x threads <= cores. With both derived: a run gets up to 4 threads, and the
    cores are split into as many runs as that allows (2 cores: 1 run x 2 threads)."""
    cores = max(1, cores or usable_cores())
    runs, threads = settings.max_concurrent_runs, settings.torch_threads
    if not runs and not threads:
        threads = min(cores, 4)
        runs = max(1, cores // threads)
    elif not threads:
        threads = max(1, cores // runs)
    elif not runs:
        runs = max(1, cores // threads)
    return Concurrency(runs=runs, torch_threads=threads)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), else os.cpu_count()."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class Saturated(Exception):
    """No run slot came free within the queue wait."""


class RunLimiter:
    """At most `slots` heavy runs at once, each in a worker thread so the event loop stays
    free; a run that cannot start within `wait_s` raises Saturated (-> 503 + Retry-After).

    Semaphores are made per event loop (TestClient may start one loop per request)."""

    def __init__(self, slots: int, wait_s: float) -> None:
        self.slots = slots
        self.wait_s = wait_s
        self._semaphores: weakref.WeakKeyDictionary[Any, anyio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    def _semaphore(self) -> anyio.Semaphore:
        loop = asyncio.get_running_loop()
        if loop not in self._semaphores:
            self._semaphores[loop] = anyio.Semaphore(self.slots)
        return self._semaphores[loop]

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        async with self.slot():
            # not abandoned on cancel: the slot stays taken until the thread is done
            return await anyio.to_thread.run_sync(fn, *args)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one run slot for the body (a training holds it for its whole stream)."""
        semaphore = self._semaphore()
        try:
            semaphore.acquire_nowait()
        except anyio.WouldBlock:
            with anyio.move_on_after(self.wait_s) as scope:
                await semaphore.acquire()
            if scope.cancelled_caught:
                raise Saturated from None
        try:
            yield
        finally:
            semaphore.release()


def retry_after(settings: Settings) -> str:
    return str(max(1, math.ceil(settings.queue_wait_s)))


# --- request bodies --------------------------------------------------------------------------


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`, without reading it whole.

    A Content-Length over the limit is refused before reading anything; otherwise (chunked
    bodies included) the chunks are counted as they arrive and the request is refused as
    soon as they pass the limit. A body within the limit is handed on unchanged."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await self._refuse(send, 400, "Content-Length is not a non-negative integer")
                return
            if int(length) > self.max_bytes:
                await self._refuse_size(send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse_size(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)

    async def _refuse_size(self, send: Send) -> None:
        await self._refuse(
            send,
            413,
            f"request body over the limit of {self.max_bytes} bytes (BROADPROP_MAX_BODY_BYTES)",
        )

    @staticmethod
    async def _refuse(send: Send, status: int, detail: str) -> None:
        response = StrictJSONResponse({"detail": detail}, status_code=status)
        response.headers["connection"] = "close"  # the rest of the body is never read
        await response({"type": "http"}, _never_receive, send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive() that gives `messages` first, then defers to the real one."""
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay


async def _never_receive() -> Message:
    return {"type": "http.disconnect"}


# --- errors ----------------------------------------------------------------------------------


async def validation_error(request: Request, exc: RequestValidationError) -> StrictJSONResponse:
    """FastAPI's 422 body, written as strict JSON: an input of NaN or Infinity (which Python's
    json module accepts as literals) is echoed as null, and a deep, long or huge input is
    echoed clipped, instead of failing the response."""
    errors = [
        {k: _clip(v) if k in ("input", "ctx") else v for k, v in e.items()} for e in exc.errors()
    ]
    return StrictJSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


def _clip(value: Any, depth: int = 4, items: int = 16, chars: int = 200) -> Any:
    """`value` cut to `depth` levels, `items` entries per container, `chars` per string; an
    integer JSON cannot carry exactly (over 64 bits) as a string."""
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return str(value)
    if isinstance(value, str):
        return value if len(value) <= chars else value[:chars] + "..."
    if isinstance(value, (list, tuple, dict)) and depth == 0:
        return "..."
    if isinstance(value, (list, tuple)):
        clipped = [_clip(v, depth - 1) for v in value[:items]]
        return clipped + ["..."] if len(value) > items else clipped
    if isinstance(value, dict):
        pairs = list(value.items())
        clipped = {str(k)[:chars]: _clip(v, depth - 1) for k, v in pairs[:items]}
        return {**clipped, "...": "..."} if len(pairs) > items else clipped
    return value


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI answers a body it cannot decode (not UTF-8, nested deeper than the parser's
    recursion limit) with a bare 400; give it the same 422 as any other invalid JSON."""
    cause = exc.__cause__
    if exc.status_code == 400 and isinstance(cause, (UnicodeDecodeError, RecursionError)):
        why = "not UTF-8" if isinstance(cause, UnicodeDecodeError) else "nested too deeply"
        error = {"type": "json_invalid", "loc": ["body"], "msg": f"JSON decode error: {why}"}
        return StrictJSONResponse({"detail": [{**error, "input": {}}]}, status_code=422)
    return await http_exception_handler(request, exc)


async def saturated(request: Request, exc: Saturated) -> StrictJSONResponse:
    settings = request.app.state.settings
    return StrictJSONResponse(
        {
            "detail": f"the server is busy: every run slot ({request.app.state.limiter.slots}) "
            f"stayed taken for {settings.queue_wait_s} s; retry later"
        },
        status_code=503,
        headers={"Retry-After": retry_after(settings)},
    )


async def unexpected(request: Request, exc: Exception) -> StrictJSONResponse:
    """The last resort: a 503 with the error's kind, never a 500. Logged with its traceback."""
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return StrictJSONResponse(
        {"detail": f"the server could not complete this request ({type(exc).__name__})"},
        status_code=503,
        headers={"Retry-After": retry_after(request.app.state.settings)},
    )


def guarded(fn: Callable[..., T], settings: Settings) -> Callable[..., T]:
    """`fn` with the errors a run can raise mapped to HTTP errors: out of memory -> 503 with
    Retry-After; a ValueError (a config the engine cannot run) -> 422."""

    def call(*args: Any) -> T:
        try:
            return fn(*args)
        except MemoryError:
            raise _out_of_memory(settings) from None
        except RuntimeError as e:
            if "memory" in str(e).lower() or "alloc" in str(e).lower():
                raise _out_of_memory(settings) from e
            raise
        except ValueError as e:
            raise RequestValidationError(
                [{"type": "value_error", "loc": ("body",), "msg": str(e), "input": None}]
            ) from e

    return call


def _out_of_memory(settings: Settings) -> HTTPException:
    return HTTPException(
        503,
        "the server ran out of memory for this run; retry later or shrink the run "
        f"(BROADPROP_MEMORY_BUDGET_BYTES is {settings.memory_budget_bytes})",
        headers={"Retry-After": retry_after(settings)},
    )


# --- OpenAPI -------------------------------------------------------------------------------


def exact_openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """app.openapi, with the integer limits pydantic wrote restored exactly: FastAPI's OpenAPI
    model stores `maximum` as a float, which turns the seed's 2^63 - 1 into 2^63."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        schema = generate()
        if fresh:
            components = schema.get("components", {}).get("schemas", {})
            for name, component in components.items():
                model = getattr(schemas, name.removesuffix("-Input").removesuffix("-Output"), None)
                if isinstance(model, type) and issubclass(model, BaseModel):
                    mode = "serialization" if name.endswith("-Output") else "validation"
                    components[name] = _exact_ints(component, model.model_json_schema(mode=mode))
        return schema

    return openapi


def _exact_ints(generated: Any, source: Any) -> Any:
    """`generated`, with each float that stands for an int of `source` at the same place
    replaced by that int."""
    if isinstance(generated, dict) and isinstance(source, dict):
        return {k: _exact_ints(v, source[k]) if k in source else v for k, v in generated.items()}
    if isinstance(generated, list) and isinstance(source, list) and len(generated) == len(source):
        return [_exact_ints(g, s) for g, s in zip(generated, source)]
    if isinstance(generated, float) and schemas._is_int(source) and float(source) == generated:
        return source
    return generated


# --- startup ---------------------------------------------------------------------------------


def warm_up() -> None:
    """Pay torch's and the meta tracer's first-call costs (~1 s) at startup, not on the first
    request; and cache the article's trace."""
    from app import pipeline
    from app.schemas import RunRequest

    small = RunRequest(batch=2, in_features=3, hidden=[4], max_cells=16)
    pipeline.run(small, 1 << 16)
    pipeline.trace(RunRequest())


@asynccontextmanager
async def lifespan(app: FastAPI):
    torch.set_num_threads(app.state.concurrency.torch_threads)
    try:
        await anyio.to_thread.run_sync(warm_up)
    except Exception:  # a failed warm-up only costs the first request its speed
        log.exception("warm-up failed")
    yield


def install(app: FastAPI, settings: Settings) -> None:
    """Body limit, run limiter, error handlers and the startup lifespan, on `app`."""
    concurrency = derive_concurrency(settings)
    app.state.settings = settings
    app.state.concurrency = concurrency
    app.state.limiter = RunLimiter(concurrency.runs, settings.queue_wait_s)
    app.router.lifespan_context = lifespan
    app.openapi = exact_openapi(app)  # type: ignore[method-assign]
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Saturated, saturated)
    app.add_exception_handler(Exception, unexpected)
