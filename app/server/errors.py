"""Errors mapped to statuses, as strict JSON: the client's mistakes to 4xx, busy to 503, our
own bugs to 500 (never a traceback to the client); running out of memory in a run to 503
(`guarded`); and a log that cannot be flooded."""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.refusal import Refused
from app.server.lanes import Saturated, Stopped
from app.server.responses import StrictJSONResponse
from app.settings import Settings

log = logging.getLogger("broadprop")
T = TypeVar("T")


def retry_after(settings: Settings) -> str:
    return str(max(1, math.ceil(settings.queue_wait_s)))


def guarded(fn: Callable[..., T], settings: Settings) -> Callable[..., T]:
    """`fn` with running out of memory mapped to 503 with Retry-After. Every other error
    passes on: a learner's mistake is mapped to its 422 where it is known (at its field),
    anything else is our own bug (a 500, app.server.errors)."""

    def call(*args: Any) -> T:
        try:
            return fn(*args)
        except MemoryError:
            raise _run_out_of_memory(settings) from None
        except RuntimeError as e:
            if "memory" in str(e).lower() or "alloc" in str(e).lower():
                raise _run_out_of_memory(settings) from e
            raise

    return call


def _run_out_of_memory(settings: Settings) -> HTTPException:
    return HTTPException(
        503,
        "the server ran out of memory for this run; retry later or shrink the run "
        f"(BROADPROP_MEMORY_BUDGET_BYTES is {settings.memory_budget_bytes})",
        headers={"Retry-After": retry_after(settings)},
    )


async def validation_error(
    request: Request, exc: RequestValidationError | Refused
) -> StrictJSONResponse:
    """FastAPI's 422 body, written as strict JSON: an input of NaN or Infinity (which Python's
    json module accepts as literals) is echoed as null, and a deep, long or huge input is
    echoed clipped, instead of failing the response."""
    errors = [
        {k: clip(v) if k in ("input", "ctx") else v for k, v in e.items()} for e in exc.errors()
    ]
    return StrictJSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


_SURROGATE = re.compile("[\ud800-\udfff]")


def clip(value: Any, depth: int = 4, items: int = 16, chars: int = 200) -> Any:
    """`value` cut to `depth` levels, `items` entries per container, `chars` per string; an
    integer JSON cannot carry exactly (over 64 bits) as a string; a lone surrogate (which no
    UTF-8 can carry) as U+FFFD."""
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return str(value)
    if isinstance(value, str):
        value = _SURROGATE.sub("\ufffd", value)
        return value if len(value) <= chars else value[:chars] + "..."
    if isinstance(value, (list, tuple, dict)) and depth == 0:
        return "..."
    if isinstance(value, (list, tuple)):
        clipped = [clip(v, depth - 1) for v in value[:items]]
        return clipped + ["..."] if len(value) > items else clipped
    if isinstance(value, dict):
        pairs = list(value.items())
        clipped = {clip(str(k)[:chars]): clip(v, depth - 1) for k, v in pairs[:items]}
        return {**clipped, "...": "..."} if len(pairs) > items else clipped
    return value


def json_invalid(msg: str) -> StrictJSONResponse:
    error = {"type": "json_invalid", "loc": ["body"], "msg": f"JSON decode error: {msg}"}
    return StrictJSONResponse({"detail": [{**error, "input": {}}]}, status_code=422)


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI answers a body it cannot decode (not UTF-8, nested deeper than the parser's
    recursion limit, an integer of more digits than Python parses) with a bare 400; give it
    the same 422 as any other invalid JSON."""
    cause = exc.__cause__
    if exc.status_code == 400 and isinstance(cause, (ValueError, RecursionError)):
        if isinstance(cause, UnicodeDecodeError):
            why = "not UTF-8"
        elif isinstance(cause, RecursionError):
            why = "nested too deeply"
        elif "digits" in str(cause):
            why = "an integer with too many digits"
        else:
            why = "invalid"
        return json_invalid(why)
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


def _smaller(path: str) -> str:
    """How to make a run of this route smaller, in the settings the route has."""
    if path.startswith("/api/program"):
        return "make the inputs' shapes smaller, or the loops shorter"
    return "reduce batch or the widths, or turn off compare and fd_samples"


async def stopped(request: Request, exc: Stopped) -> StrictJSONResponse:
    """A run stopped at its deadline: 422 (retrying cannot help). One the machine was too
    busy to run in time: 503 with Retry-After (the run itself is within bounds). One whose
    client hung up: nobody reads the answer; 499, as nginx logs it."""
    if exc.reason == "disconnect":
        return StrictJSONResponse({"detail": "the client closed the connection"}, 499)
    if exc.reason == "busy":
        return StrictJSONResponse(
            {
                "detail": "the server is too busy to finish this run in time (it is within "
                "the limits: retry after Retry-After seconds)"
            },
            status_code=503,
            headers={"Retry-After": retry_after(request.app.state.settings)},
        )
    error = {
        "type": "work_limit",
        "loc": ["body"],
        "msg": f"this run was still going after {exc.deadline_s:g} s, the most one run may "
        "take (BROADPROP_RUN_DEADLINE_S), and was stopped; "
        + (exc.advice or _smaller(request.url.path)),
        "input": None,
        "ctx": {"deadline_s": exc.deadline_s},
    }
    return StrictJSONResponse({"detail": [error]}, status_code=422)


def internal_error(exc: BaseException) -> StrictJSONResponse:
    """Our own bug: a 500 that names the error's kind, never its traceback (that is logged)."""
    return StrictJSONResponse(
        {"detail": f"the server failed on this request: a bug on our side ({type(exc).__name__})"},
        status_code=500,
    )


async def unexpected(request: Request, exc: Exception) -> StrictJSONResponse:
    """The last resort, for an error in the middleware itself (Starlette's ServerErrorMiddleware
    calls this, then re-raises to the server): 500, or 503 when memory ran out."""
    if isinstance(exc, MemoryError):
        return _out_of_memory(request)
    return internal_error(exc)


def _out_of_memory(request: Request | None) -> StrictJSONResponse:
    headers = {"Retry-After": retry_after(request.app.state.settings)} if request else {}
    return StrictJSONResponse(
        {"detail": "the server ran out of memory for this request; retry later"},
        status_code=503,
        headers=headers,
    )


class InternalErrorMiddleware:
    """An error no handler maps (our own bug, never the learner's text) becomes a 500 here,
    logged once with its traceback, and stops here: the server keeps the connection alive
    (an exception that reached it would make it log the traceback again and close the
    socket). MemoryError is a 503 with Retry-After. Once a response has started (a stream),
    only the server can end it: re-raised."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if started:
                raise
            log.error("internal error on %s %s", scope.get("method"), scope.get("path"),
                      exc_info=exc)  # fmt: skip
            request = Request(scope) if isinstance(exc, MemoryError) else None
            response = _out_of_memory(request) if request else internal_error(exc)
            await response(scope, receive, send)


# --- the log ---------------------------------------------------------------------------------


class RateLimitFilter(logging.Filter):
    """At most `burst` records of one kind (logger, level, message template) at once, then
    `per_s` a second; what is dropped is counted and said on the next record let through."""

    def __init__(self, burst: float = 10, per_s: float = 1.0) -> None:
        super().__init__()
        self.burst, self.per_s = burst, per_s
        self._buckets: dict[tuple, list[float]] = {}  # key -> [tokens, last time, dropped]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg)[:200])
        now = time.monotonic()
        with self._lock:
            if len(self._buckets) > 1000:  # bounded, whatever the messages
                self._buckets.clear()
            tokens, last, dropped = self._buckets.get(key, [self.burst, now, 0])
            tokens = min(self.burst, tokens + (now - last) * self.per_s)
            if tokens < 1:
                self._buckets[key] = [tokens, now, dropped + 1]
                return False
            self._buckets[key] = [tokens - 1, now, 0]
        if dropped:
            record.msg = f"{record.msg} [{int(dropped)} more like this were not logged]"
        return True


RATE_LIMITED_LOGGERS = ("broadprop", "asyncio", "uvicorn.error", "uvicorn.access")


def limit_log_rates() -> None:
    """Put a RateLimitFilter on the loggers a flood could fill (once per logger)."""
    for name in RATE_LIMITED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimitFilter) for f in logger.filters):
            access = name == "uvicorn.access"
            logger.addFilter(RateLimitFilter(burst=200, per_s=50) if access else RateLimitFilter())
