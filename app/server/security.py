"""Nothing from elsewhere: a Host allowlist (DNS rebinding), same-origin JSON for the compute
routes (no form or no-cors fetch from another page can start a run), security headers on
every response (CSP: only this origin; no framing), HEAD wherever GET works, and request
bodies that are a JSON object of real text (no lone surrogates)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.server.body import refuse, replay

LOOPBACK = frozenset({"127.0.0.1", "localhost", "[::1]"})
# Starlette's TestClient with its defaults: scope["client"] and the Host it sends
# (starlette.testclient.TestClient(client=..., base_url="http://testserver")).
TEST_CLIENT = ("testclient", 50000)
TEST_HOST = "testserver"
PROXY_HEADERS = (b"x-forwarded-for", b"forwarded")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


# Plotly.js writes its own stylesheet at run time (a <style> element it fills through CSSOM)
# and sets style attributes on the SVG it draws; see README "Security headers" for why
# style-src keeps 'unsafe-inline' and script-src does not.
CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


def split_host(host: str) -> tuple[str, int | None]:
    """'Example.org:8000' -> ('example.org', 8000); '[::1]' -> ('[::1]', None)."""
    host = host.strip().lower()
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and (not name.startswith("[") or name.endswith("]")):
        return name, int(port)
    return host, None


class HostAllowlist:
    """Loopback names on the serving port, and `extra` ("name", "name:port" or "*")."""

    def __init__(self, extra: str = "") -> None:
        entries = [e.strip().lower() for e in extra.split(",") if e.strip()]
        self.any = "*" in entries
        self.entries = [split_host(e) for e in entries if e != "*"]

    def allows(self, host: str, serving_port: int | None) -> bool:
        if self.any:
            return True
        name, port = split_host(host)

        def port_ok(wanted: int | None) -> bool:  # wanted None: the serving port
            wanted = serving_port if wanted is None else wanted
            if wanted is None:  # the serving port is unknown (a unix socket)
                return True
            return port == wanted or (port is None and wanted in (80, 443))

        if not name:
            return False
        if name in LOOPBACK and port_ok(None):
            return True
        return any(name == n and port_ok(p) for n, p in self.entries)


def in_process_test_client(scope: Scope, host: str, headers: dict[bytes, bytes]) -> bool:
    """A request from Starlette's TestClient with its defaults, in this process: served like
    a browser at localhost, so `TestClient(app)` works in anyone's pytest suite unconfigured.

    Why no socket can pass for it: a server fills `scope["client"]` from the peer's address
    (an IP address, or None for a unix socket), never the name "testclient". The one way a
    socket's request gets a name there is a proxy-headers middleware reading X-Forwarded-For
    or Forwarded (uvicorn's is on by default for 127.0.0.1, and reads "testclient:50000" as
    that pair), so a request carrying either header is not taken for the TestClient. And DNS
    rebinding needs the attacker's own name in Host, which is not "testserver"."""
    client = scope.get("client")
    return (
        client is not None
        and tuple(client) == TEST_CLIENT
        and split_host(host)[0] == TEST_HOST
        and not any(h in headers for h in PROXY_HEADERS)
    )


class ComputeRoutes:
    """The routes that take a POST (the compute routes), read from the app's routes the first
    time they are needed (routers are included after the middleware is installed). A POST
    elsewhere is left to the router (404, 405)."""

    def __init__(self, routes: Callable[[], list[Any]]) -> None:
        self._routes = routes
        self._patterns: list[Any] | None = None

    def __call__(self, scope: Scope) -> bool:
        if scope["method"] != "POST":
            return False
        if self._patterns is None:
            found = list(_post_routes(self._routes()))
            # nothing found means routes this code cannot read: then every POST is checked
            self._patterns = found or [re.compile(".*")]
        return any(p.match(scope["path"]) for p in self._patterns)


def _post_routes(routes: list[Any]):
    """Path patterns of the routes that take POST, nested routers included (FastAPI keeps an
    included router as one entry whose `effective_candidates()` lists its routes)."""
    for route in routes:
        nested = getattr(route, "effective_candidates", None)
        if callable(nested):
            yield from _post_routes(nested())
        elif "POST" in (getattr(route, "methods", None) or ()) and hasattr(route, "path_regex"):
            yield route.path_regex


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope["headers"]}


class GuardMiddleware:
    """Outermost: security headers on every response; 400 for a Host not allowed (Starlette's
    TestClient with its defaults is served as a browser at localhost would be); HEAD
    served as GET without the body; for any other method than GET/HEAD/OPTIONS, 403 when
    the browser says the request comes from another origin (Origin, Sec-Fetch-Site); for a
    POST to a compute route, 415 for a body that is not declared application/json."""

    def __init__(self, app: ASGIApp, compute: ComputeRoutes, allowed_hosts: str = "") -> None:
        self.app = app
        self.compute = compute
        self.hosts = HostAllowlist(allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = scope["method"] == "HEAD"
        send = self._secured(send, strip_body=head)
        headers = _headers(scope)
        host = headers.get(b"host", b"").decode("latin-1")
        server = scope.get("server")
        if not (
            self.hosts.allows(host, server[1] if server else None)
            or in_process_test_client(scope, host, headers)
        ):
            detail = (
                f"Host {host[:100]!r} is not served here; add it to BROADPROP_ALLOWED_HOSTS "
                "to serve this name"
            )
            await refuse(send, 400, detail)
            return
        if scope["method"] not in SAFE_METHODS:
            origin = headers.get(b"origin")
            own = f"{scope.get('scheme', 'http')}://{host}".lower().encode("latin-1")
            site = headers.get(b"sec-fetch-site", b"same-origin")
            if (origin is not None and origin.lower() != own) or site not in (
                b"same-origin",
                b"none",
            ):
                await refuse(send, 403, "cross-origin requests may not start runs")
                return
        if self.compute(scope):
            media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if media != b"application/json":
                detail = "the body must be JSON, sent with Content-Type: application/json"
                await refuse(send, 415, detail)
                return
        if head:
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)

    @staticmethod
    def _secured(send: Send, strip_body: bool) -> Send:
        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            elif message["type"] == "http.response.body" and strip_body:
                message = {**message, "body": b""}
            await send(message)

        return secured


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def lone_surrogate(value: Any, path: tuple = ()) -> tuple | None:
    """The path to the first string (or key) holding a lone surrogate, else None."""
    if isinstance(value, str):
        return path if any(0xD800 <= ord(c) <= 0xDFFF for c in value) else None
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = lone_surrogate(item, (*path, i))
            if found is not None:
                return found
    if isinstance(value, dict):
        for key, item in value.items():
            if lone_surrogate(key) is not None:
                return path
            found = lone_surrogate(item, (*path, key))
            if found is not None:
                return found
    return None


class JsonBodyMiddleware:
    """Inside the body limit (the body is whole): a POST body to a compute route must be a JSON object; an empty
    body, `null`, a list or a scalar is a 422, and so is a string or key holding a lone
    surrogate (valid JSON escapes, but no text: it could not even be echoed back)."""

    def __init__(self, app: ASGIApp, compute: ComputeRoutes) -> None:
        self.app = app
        self.compute = compute

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.compute(scope):
            await self.app(scope, receive, send)
            return
        message = await receive()
        body = message.get("body", b"") if message["type"] == "http.request" else b""
        error = self._error(body) if message["type"] == "http.request" else None
        if error is not None:
            loc, msg = error
            detail = [{"type": "json_invalid", "loc": loc, "msg": msg, "input": {}}]
            await refuse(send, 422, detail, close=False)
            return
        await self.app(scope, replay([message], receive), send)

    @staticmethod
    def _error(body: bytes) -> tuple[list, str] | None:
        start = body.lstrip(b" \t\r\n\xef\xbb\xbf")[:1]
        if not start:
            return ["body"], "the body is empty: send a JSON object ({} for every default)"
        if start != b"{":
            if start in (b"[", b'"', b"n", b"t", b"f", b"-") or start.isdigit():
                return ["body"], "the body must be a JSON object, not null, a list or a scalar"
            return None  # not JSON at all: the route's parser says why
        if _SURROGATE_ESCAPE.search(body) is None:
            return None
        try:
            value = json.loads(body)
        except (ValueError, RecursionError):
            return None  # the route's parser says why
        path = lone_surrogate(value)
        if path is None:
            return None
        return (
            ["body", *path],
            "JSON decode error: a lone surrogate (\\ud800-\\udfff not in a pair) is not text",
        )
