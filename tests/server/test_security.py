"""Nothing from elsewhere (issue 13): Host allowlist, same-origin JSON for the compute routes,
security headers everywhere, HEAD where GET works, and bodies that are one JSON object of
real text."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.server.security import HostAllowlist
from app.settings import Settings

pytestmark = pytest.mark.app_settings(raise_server_exceptions=False)

JSON = {"content-type": "application/json"}
SMALL = {"batch": 2, "in_features": 3, "hidden": [2]}
ROUTES = {"/api/run": SMALL, "/api/broadcast": {"a": [2, 1], "b": [3]}}


@pytest.fixture(scope="module")
def loopback() -> TestClient:
    """As a browser on this machine sees the server: http://127.0.0.1:8123."""
    app = create_app(Settings(allowed_hosts=""))
    with TestClient(app, base_url="http://127.0.0.1:8123", raise_server_exceptions=False) as c:
        yield c


# --- Host --------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1:8123", "localhost:8123", "[::1]:8123"])
def test_loopback_names_on_the_serving_port_are_served(loopback, host):
    assert loopback.get("/healthz", headers={"host": host}).status_code == 200


@pytest.mark.parametrize(
    "host", ["evil.rebind.example", "evil.rebind.example:8123", "localhost:9999", "127.0.0.2:8123"]
)
def test_other_hosts_are_refused(loopback, host):
    """DNS rebinding: a name the attacker controls, pointed at 127.0.0.1, gets nothing."""
    for method, path in (("GET", "/"), ("GET", "/healthz"), ("POST", "/api/run")):
        r = loopback.request(method, path, headers={"host": host, **JSON}, content=b"{}")
        assert r.status_code == 400, (method, path, r.status_code)
        assert "BROADPROP_ALLOWED_HOSTS" in r.json()["detail"]


def test_allowed_hosts_widen_the_list():
    hosts = HostAllowlist("192.168.1.20, teacher.local:9000")
    assert hosts.allows("192.168.1.20:8000", 8000)
    assert not hosts.allows("192.168.1.20:8001", 8000)
    assert hosts.allows("teacher.local:9000", 8000)
    assert not hosts.allows("teacher.local:8000", 8000)
    assert hosts.allows("localhost:8000", 8000)
    assert not hosts.allows("evil.example:8000", 8000)
    assert HostAllowlist("*").allows("anything:1", 8000)
    app = create_app(Settings(allowed_hosts="192.168.1.20"))
    with TestClient(app, base_url="http://192.168.1.20:8000") as c:
        assert c.get("/healthz").status_code == 200


# --- Starlette's TestClient, with its defaults --------------------------------------------


def test_the_test_client_with_its_defaults_is_served(monkeypatch):
    """A user's own pytest suite: `TestClient(app)`, no setting, no environment variable."""
    monkeypatch.delenv("BROADPROP_ALLOWED_HOSTS", raising=False)
    with TestClient(create_app(Settings(allowed_hosts=""))) as c:
        page = c.get("/")
        assert page.status_code == 200, page.text[:200]
        run = c.post("/api/run", json={})
        assert run.status_code == 200, run.text[:200]
        assert run.json()["check"]["all_close"]


def test_what_the_server_takes_for_the_test_client_is_starlettes_default():
    """The signal is the installed Starlette's own default: a TestClient that sends anything
    else (after an upgrade, say) must make this fail, not silently go unserved."""
    import inspect
    from urllib.parse import urlsplit

    from app.server.security import TEST_CLIENT, TEST_HOST

    defaults = inspect.signature(TestClient.__init__).parameters
    assert tuple(defaults["client"].default) == TEST_CLIENT
    assert urlsplit(defaults["base_url"].default).hostname == TEST_HOST


@pytest.mark.parametrize(
    "kwargs, headers",
    [
        ({"client": ("127.0.0.1", 50000)}, {}),  # a real peer address, Host testserver
        ({"base_url": "http://evil.rebind.example"}, {}),  # another name
        ({}, {"host": "evil.rebind.example"}),
        ({}, {"x-forwarded-for": "testclient:50000"}),  # a proxy said so: not in-process
        ({}, {"forwarded": "for=testclient"}),
    ],
)
def test_only_the_test_clients_defaults_are_taken_for_it(kwargs, headers):
    with TestClient(create_app(Settings(allowed_hosts="")), **kwargs) as c:
        r = c.get("/healthz", headers=headers)
        assert r.status_code == 400, (kwargs, headers)
        assert "BROADPROP_ALLOWED_HOSTS" in r.json()["detail"]


@pytest.mark.load
def test_no_socket_passes_for_the_test_client(server):
    """Over a real socket to `python -m app` (uvicorn, whose proxy headers are on for
    127.0.0.1: it turns `X-Forwarded-For: testclient:50000` into that very scope client), a
    DNS-rebinding page that also names itself testserver still gets 400."""
    import http.client
    from urllib.parse import urlsplit

    port = urlsplit(server).port

    def get(headers: dict[str, str]) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/healthz", headers=headers)
        status = conn.getresponse().status
        conn.close()
        return status

    assert get({"Host": f"127.0.0.1:{port}"}) == 200  # served as it should be
    for forged in (
        {"Host": "testserver"},
        {"Host": "testserver", "X-Forwarded-For": "testclient:50000"},
        {"Host": "testserver", "Forwarded": "for=testclient"},
    ):
        assert get(forged) == 400, forged


# --- Origin and content type ------------------------------------------------------------


@pytest.mark.parametrize("route", list(ROUTES))
def test_cross_origin_posts_are_403(loopback, route):
    body = ROUTES[route]
    for headers in (
        {"origin": "http://evil.example"},
        {"origin": "null"},  # a sandboxed iframe, a file:// page
        {"origin": "http://127.0.0.1:9999"},  # another local server
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site"},
    ):
        r = loopback.post(route, json=body, headers=headers)
        assert r.status_code == 403, headers
    assert loopback.post(route, json=body, headers={"origin": "http://127.0.0.1:8123"}).is_success
    same = {"sec-fetch-site": "same-origin", "origin": "http://127.0.0.1:8123"}
    assert loopback.post(route, json=body, headers=same).is_success


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None],
)
def test_non_json_bodies_are_415(client, route, content_type):
    """What a no-cors fetch or a form from another page can send: never a run."""
    headers = {"content-type": content_type} if content_type else {}
    for body in (b"", b"{}"):
        r = client.post(route, content=body, headers=headers)
        assert r.status_code == 415, (content_type, body, r.status_code)


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("body", [b"", b"   ", b"null", b"[]", b"[{}]", b"42", b'"x"', b"true"])
def test_empty_null_and_non_object_bodies_are_422(client, route, body):
    r = client.post(route, content=body, headers=JSON)
    assert r.status_code == 422, (body, r.status_code, r.text[:200])
    assert r.json()["detail"][0]["loc"][0] == "body"


def test_json_with_charset_is_json(client):
    r = client.post(
        "/api/run", content=b"{}", headers={"content-type": "application/json; charset=utf-8"}
    )
    assert r.status_code == 200


# --- undecodable input ------------------------------------------------------------------


@pytest.mark.parametrize(
    "route, body, loc",
    [
        ("/api/run", b'{"activation": "\\ud800"}', ["body", "activation"]),
        ("/api/run", b'{"\\udc00": 1}', ["body"]),
        ("/api/run", b'{"hidden": ["\\ud800"]}', ["body", "hidden", 0]),
        ("/api/run", b'{"activation": "relu\\udfff"}', ["body", "activation"]),
        ("/api/broadcast", b'{"a": ["\\ud800"], "b": [1]}', ["body", "a", 0]),
        ("/api/broadcast", b'{"\\ud800": [1], "b": [1]}', ["body"]),
    ],
)
def test_lone_surrogates_are_422(client, route, body, loc):
    r = client.post(route, content=body, headers=JSON)
    assert r.status_code == 422, r.text[:300]
    (error,) = r.json()["detail"]
    assert error["loc"] == loc
    assert "surrogate" in error["msg"]


def test_a_surrogate_pair_is_text(client):
    # an emoji written as its escaped pair is valid text: refused as an activation, not as JSON
    r = client.post("/api/run", content=b'{"activation": "\\ud83d\\ude00"}', headers=JSON)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "activation"]
    assert r.json()["detail"][0]["type"] != "json_invalid"


@pytest.mark.parametrize("route", list(ROUTES))
def test_5000_digit_integers_are_422(client, route):
    field = b'"seed"' if route == "/api/run" else b'"a"'
    value = b"1" * 5000 if route == "/api/run" else b"[" + b"1" * 5000 + b"]"
    r = client.post(route, content=b"{" + field + b": " + value + b"}", headers=JSON)
    assert r.status_code == 422, r.text[:200]
    assert r.json()["detail"][0]["type"] == "json_invalid"


@pytest.mark.parametrize(
    "body",
    [
        {"compare": "yes"},
        {"compare": 1},
        {"compare": "f"},
        {"reference_heatmaps": "true"},
        {"reference_heatmaps": 0},
        {"init_scale": "1.5"},
        {"init_scale": True},
    ],
)
def test_booleans_and_floats_are_strict(client, body):
    r = client.post("/api/run", json={**SMALL, **body})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", next(iter(body))]


# --- headers and HEAD -----------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/"),
        ("GET", "/?in_features=2048&hidden=2048&strategy=broadcast&fd_samples=1&batch=297"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/static/css/page.css"),
        ("GET", "/healthz"),
        ("GET", "/nothing-here"),
        ("POST", "/api/run"),
        ("POST", "/api/broadcast"),
    ],
)
def test_security_headers_everywhere(client, method, path):
    r = client.request(method, path, json={} if method == "POST" else None)
    csp = r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert (
        "unsafe-eval" not in csp
        and "'unsafe-inline'" not in csp.split("script-src")[1].split(";")[0]
    )
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"


@pytest.mark.parametrize(
    "path", ["/", "/healthz", "/docs", "/openapi.json", "/static/css/page.css"]
)
def test_head_works_where_get_does(client, path):
    get, head = client.get(path), client.head(path)
    assert get.status_code == head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


def test_templates_hold_no_inline_script_or_style(client):
    """Under script-src 'self' an inline script would not run: the page and /docs load theirs
    from files (the page's JSON data block is data, not script)."""
    import re

    for path in ("/", "/docs"):
        html = client.get(path).text
        for tag in re.findall(r"<script[^>]*>", html):
            assert "src=" in tag or 'type="application/json"' in tag, (path, tag)
        assert "<style" not in html, path
        assert not re.search(r"\son[a-z]+=", html), path  # no inline event handlers
