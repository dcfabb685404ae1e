"""Starting up: the lifespan (torch threads, a warm-up), and serving with uvicorn behind a
connection guard (`serve`, used by `python -m app`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

import h11
import torch
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.sandbox.allocator import freeze_long_lived
from app.server.errors import limit_log_rates
from app.settings import Settings

log = logging.getLogger("broadprop")


def lifespan_with(warm_up: Callable[[], None] | None):
    """A lifespan that sets torch's thread count, starts the run lanes' threads and runs
    `warm_up` on each (torch's and the tracer's first-call costs, paid at startup rather
    than by the first request)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        torch.set_num_threads(app.state.concurrency.torch_threads)
        limit_log_rates()
        try:
            await app.state.limiter.start(warm_up)
        except Exception:  # a failed warm-up only costs the first request its speed
            log.exception("warm-up failed")
        # the program workers warm up in the background (a few seconds, once): the server
        # answers meanwhile, and a program that comes first waits for them
        app.state.sandbox.start_soon()
        freeze_long_lived()  # before the first request: collections skip the startup's objects
        yield

    return lifespan


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with three guards a bare uvicorn lacks:
    - a request (head and body) must arrive whole within `request_timeout_s` of its first
      byte: half-sent requests no longer hold sockets for minutes. A socket that has sent
      nothing yet gets as long while the server holds over half its connection bound, else
      up to `silent_timeout_s` (browsers open spare sockets ahead of need);
    - a client that reads nothing of its response for `send_timeout_s` is dropped, and the
      unsent response with it (uvicorn would keep it buffered for as long as the socket lives);
    - at most `max_connections` sockets at once: one more is dropped as it opens (uvicorn's
      limit_concurrency answers 503 before that).
    Subclass it with the three set (`guarded_protocol`)."""

    request_timeout_s: float = 5.0
    send_timeout_s: float = 10.0
    max_connections: int = 512
    # how long a socket that has sent nothing may stay while the server is not crowded
    silent_timeout_s: float = 60.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._request_timer: asyncio.TimerHandle | None = None
        self._started = False  # a byte of the current request has come
        self._opened_at = asyncio.get_running_loop().time()
        self._send_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        if not self._admit():
            transport.abort()
            return
        self._arm_request_timer()

    def _address(self) -> str | None:
        client = getattr(self, "client", None)
        return client[0] if client else None

    def _admit(self) -> bool:
        """Each client address gets a share of the bound: at most half of it, a quarter
        while the server is crowded (over half the bound open). Over the bound, the
        heaviest client's newest silent socket (no byte of a request yet) is closed to
        make room, so that one address with many silent sockets cannot keep others out."""
        crowded = len(self.connections) > self.max_connections // 2
        share = max(1, self.max_connections // (4 if crowded else 2))
        by_client: dict[str | None, list[GuardedH11Protocol]] = {}
        for c in self.connections:
            by_client.setdefault(getattr(c, "_address", lambda: None)(), []).append(c)
        mine = by_client.get(self._address(), [])
        if len(mine) > share:
            log.warning("client %s over its share of %d connections", self._address(), share)
            return False
        if len(self.connections) <= self.max_connections:
            return True
        heaviest = max(by_client.values(), key=len)
        silent = [
            c
            for c in heaviest
            if c is not self and not getattr(c, "_started", True) and c.cycle is None
        ]
        if len(heaviest) <= len(mine) or not silent:
            log.warning("over %d connections: dropping a new one", self.max_connections)
            return False
        newest = max(silent, key=lambda c: c._opened_at)
        newest.transport.close()  # quietly, with a FIN: it had sent nothing
        return True

    def data_received(self, data: bytes) -> None:
        if self._request_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_request_timer()  # the first bytes of the next request on this socket
        self._started = True
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self.conn.their_state not in (h11.SEND_BODY,):
            self._disarm("_request_timer")  # the request is in whole (or the socket is done)
            self._started = False

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm("_request_timer")
        self._disarm("_send_timer")
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout_s, self._drop, "send")

    def resume_writing(self) -> None:
        self._disarm("_send_timer")
        super().resume_writing()

    def _arm_request_timer(self) -> None:
        self._disarm("_request_timer")
        self._request_timer = self.loop.call_later(self.request_timeout_s, self._drop, "request")

    def _disarm(self, name: str) -> None:
        timer = getattr(self, name, None)
        if timer is not None:
            timer.cancel()
            setattr(self, name, None)

    def _drop(self, why: str) -> None:
        if why == "request" and self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
            return
        if why == "request" and not self._started:
            # A socket that has not begun a request: browsers open spare ones ahead of need,
            # and a busy one may not use them for many seconds. Closing them at 5 s failed 28
            # of 40 simultaneous page loads (net::ERR_SOCKET_NOT_CONNECTED on their scripts).
            # They only cost a descriptor, so they are closed (quietly, with a FIN) when the
            # server is crowded, where silent sockets would keep others out, or at last.
            # crowded: the server (over half its bound open), or this socket's client (over
            # its share while crowded: its own sockets are what keeps the server from it)
            mine = sum(c._address() == self._address() for c in self.connections)
            crowded = (
                len(self.connections) > self.max_connections // 2
                or mine > self.max_connections // 4
            )
            waited = asyncio.get_running_loop().time() - self._opened_at
            if not crowded and waited < self.silent_timeout_s:
                self._arm_request_timer()  # look again later
            else:
                self.transport.close()
            return
        log.info(
            "dropping a connection: %s",
            f"no whole request within {self.request_timeout_s:g} s"
            if why == "request"
            else f"the client read nothing of its response for {self.send_timeout_s:g} s",
        )
        self.transport.abort()


def guarded_protocol(settings: Settings, max_connections: int) -> type[GuardedH11Protocol]:
    return type(
        "GuardedProtocol",
        (GuardedH11Protocol,),
        {
            "request_timeout_s": settings.request_timeout_s,
            "send_timeout_s": settings.send_timeout_s,
            "max_connections": max_connections,
        },
    )


def connection_bound(settings: Settings) -> int:
    """BROADPROP_MAX_CONNECTIONS, kept to half the process's open-file limit (the other
    half for the app's own files and the listening socket's backlog)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return settings.max_connections
    if soft == resource.RLIM_INFINITY:
        return settings.max_connections
    return max(1, min(settings.max_connections, soft // 2))


def uvicorn_config(settings: Settings, app: str = "app.main:app") -> uvicorn.Config:
    """uvicorn serving `app` with the connection limits of `settings`."""
    bound = connection_bound(settings)
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(settings, bound),
        timeout_keep_alive=max(1, round(settings.keep_alive_s)),
        limit_concurrency=bound,
        backlog=min(2048, 4 * bound),
        log_level="info",
    )


def serve(settings: Settings) -> None:
    limit_log_rates()
    uvicorn.Server(uvicorn_config(settings)).run()
