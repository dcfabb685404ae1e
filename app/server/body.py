"""Request bodies: a 413 for a body over the limit, without reading it whole; and the small
ASGI helpers that answer early or hand on what was already read."""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.server.responses import StrictJSONResponse


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`, without reading it whole.

    A Content-Length over the limit is refused before reading anything; otherwise (chunked
    bodies included) the chunks are counted as they arrive and the request is refused as
    soon as they pass the limit. A body within the limit is handed on unchanged."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, route_limits: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.route_limits = route_limits or {}  # paths whose bodies may be larger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.route_limits.get(scope.get("path", ""), self.max_bytes)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await refuse(send, 400, "Content-Length is not a non-negative integer")
                return
            if int(length) > limit:
                await self._refuse_size(send, limit)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse_size(send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, replay([body], receive), send)

    async def _refuse_size(self, send: Send, limit: int) -> None:
        setting = "" if limit != self.max_bytes else " (BROADPROP_MAX_BODY_BYTES)"
        await refuse(send, 413, f"request body over the limit of {limit} bytes{setting}")


async def refuse(send: Send, status: int, detail: Any, close: bool = True) -> None:
    """Answer `{"detail": detail}` with `status`, without reading the rest of the request."""
    response = StrictJSONResponse({"detail": detail}, status_code=status)
    if close:
        response.headers["connection"] = "close"  # the rest of the body is never read
    await response({"type": "http"}, _never_receive, send)


def replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive() that gives `messages` first, then defers to the real one."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


async def _never_receive() -> Message:
    return {"type": "http.disconnect"}
