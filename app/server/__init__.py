"""The server's plumbing, below the app: lanes (run slots, deadlines), body (size), allocator (memory),
errors (never a 500; a log that cannot be flooded), security (hosts, origins, headers),
OpenAPI (exact limits) and startup (lifespan, the connection guard). Nothing here imports
from the rest of app/ but its settings and the core's refusal and cancel token; the app hands in what it needs (`install`)."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.refusal import Refused
from app.sandbox.pool import sandbox_for
from app.server import errors
from app.server.body import BodyLimitMiddleware
from app.server.lanes import RunLimiter, Saturated, Stopped, derive_concurrency
from app.server.openapi import exact_openapi
from app.server.security import ComputeRoutes, GuardMiddleware, JsonBodyMiddleware
from app.server.startup import lifespan_with
from app.settings import Settings


def install(
    app: FastAPI,
    settings: Settings,
    models: ModuleType | None = None,
    warm_up: Callable[[], None] | None = None,
    body_models: tuple = (),
) -> None:
    """Limits, security, error handlers and the startup lifespan, on `app`. `models`: the
    module of the API's pydantic models (for exact integer limits in /openapi.json)."""
    concurrency = derive_concurrency(settings)
    app.state.settings = settings
    app.state.concurrency = concurrency
    app.state.limiter = RunLimiter(
        concurrency.runs,
        settings.queue_wait_s,
        settings.run_deadline_s,
        settings.release_memory,
        torch_threads=concurrency.torch_threads,
    )
    # learner programs run in worker processes, one per small-lane slot (app/sandbox)
    app.state.sandbox = sandbox_for(app.state.limiter.programs)
    app.router.lifespan_context = lifespan_with(warm_up)
    if models is not None:
        app.openapi = exact_openapi(app, models, body_models)  # type: ignore[method-assign]
    # the last added runs first: guard (headers, host, origin, type) -> body limit -> JSON
    # -> internal errors
    compute = ComputeRoutes(lambda: app.routes)
    app.add_middleware(errors.InternalErrorMiddleware)  # innermost: our bugs, 500
    app.add_middleware(JsonBodyMiddleware, compute=compute)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        # a program's value inputs take room: its routes (export takes a program too) take up to
        # 1 MiB (or the setting)
        route_limits={
            path: max(settings.max_body_bytes, 1 << 20)
            for path in ("/api/program", "/api/program/train", "/api/export")
        },
    )
    app.add_middleware(GuardMiddleware, compute=compute, allowed_hosts=settings.allowed_hosts)
    app.add_exception_handler(RequestValidationError, errors.validation_error)
    app.add_exception_handler(Refused, errors.validation_error)  # the core's refusals
    app.add_exception_handler(StarletteHTTPException, errors.http_error)
    app.add_exception_handler(Saturated, errors.saturated)
    app.add_exception_handler(Stopped, errors.stopped)
    app.add_exception_handler(Exception, errors.unexpected)
