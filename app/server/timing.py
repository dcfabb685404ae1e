"""Server-Timing: how long the server took on a request, so a browser (and the page
benchmark) can tell the server's share of a wait from the front end's."""

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ServerTimingMiddleware:
    """Adds `Server-Timing: app;dur=<ms>` to every HTTP response: the time from the request
    reaching the app to its response starting (validation, queueing, the run, JSON rendering,
    and compression: GZipMiddleware starts a response once its body is compressed)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                ms = (time.perf_counter() - start) * 1e3
                headers = list(message.get("headers", []))
                headers.append((b"server-timing", f"app;dur={ms:.1f}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, timed)
