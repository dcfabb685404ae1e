"""Where each error lands: the learner's text is a 422 at its key, our own bug a 500 (no
traceback to the client, the connection kept), busy a 503 (issue 22, item 1).

The fuzz builds formulas of reductions, indexing and dims over 0-d and 1-d tensors (where
`dim % ndim` once divided by zero) and fails on anything but a 200 or a 422 at the key."""

from __future__ import annotations

import http.client
import threading
import time

import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.main import create_app
from app.runs import pipeline
from tests.servers import free_port

SMALL = {"batch": 4, "in_features": 3, "hidden": [2], "seed": 1}
CLASSES = {**SMALL, "loss": "cross_entropy", "out_features": 3}
XG = "l1.g @ w1.T"  # the right x.g: the fuzz's expressions are added to it times 0


def post(client, formulas, **config):
    return client.post("/api/run", json={**SMALL, **config, "formulas": formulas})


def assert_at_key(response, key: str) -> dict:
    """A 422 whose one error is at `["body", "formulas", key]`: the learner's text."""
    assert response.status_code == 422, response.text[:400]
    (detail,) = response.json()["detail"]
    assert detail["loc"] == ["body", "formulas", key], detail
    return detail


@pytest.mark.parametrize(
    "expr",
    [
        "x.sum().sum(0)",
        "x.sum().sum(-1)",
        "x.sum().mean(0)",
        "x.sum().amax(-1)",
        "x.sum().amin(0)",
        "x.sum().sum((0,))",
        "x.sum().sum(0, keepdim=True)",
        "x[0, 0].softmax(0)",
    ],
)
def test_a_dim_on_a_0d_tensor_means_what_torch_means(client, expr):
    """torch takes dim 0 and -1 on a 0-d tensor (and reduces nothing): so does the lab."""
    r = post(client, {"x.g": f"{expr} * 0 + {XG}"})
    assert r.status_code == 200, r.text[:400]
    assert r.json()["check"]["tensors"]["x"]["allclose"]


@pytest.mark.parametrize("expr", ["x.sum().sum(1)", "x.sum().mean(-2)", "x.sum().amax((0, 0))"])
def test_a_dim_a_0d_tensor_lacks_is_the_learners_422(client, expr):
    detail = assert_at_key(post(client, {"x.g": f"{expr} * 0 + {XG}"}), "x.g")
    assert expr.split(".", 2)[-1].split("(")[0] in detail["msg"] or "dim" in detail["msg"]


@pytest.mark.parametrize(
    "source, words",
    [
        ("F.one_hot(-target, 3) * 1.0", "non-negative"),
        ("out.gather(1, F.one_hot(target, 3) * 7) * 1.0", "out of bounds"),
    ],
)
def test_a_formula_that_fails_only_on_the_numbers_is_a_422_at_its_key(client, source, words):
    """The dry run on meta tensors cannot see a negative class or an index out of range; the
    real run can, and says so at the formula's key, not at the body."""
    detail = assert_at_key(post(client, {"out.g": source}, **CLASSES), "out.g")
    assert words in detail["msg"]


@pytest.mark.parametrize(
    "error", [RuntimeError("something broke"), ValueError("an engine bug"), KeyError("w9")]
)
def test_our_own_bug_is_a_500_without_a_traceback(monkeypatch, client, error):
    """Not a 422 (the client did nothing wrong), not a 503 (retrying cannot help)."""

    def failing(cfg, chunk_bytes, cancel=None, traces=None):
        raise error

    monkeypatch.setattr(pipeline, "run", failing)
    r = post(client, {})
    assert r.status_code == 500, r.text
    assert type(error).__name__ in r.json()["detail"]
    assert "Traceback" not in r.text and "retry-after" not in r.headers


@pytest.fixture
def live_app(monkeypatch):
    """The app served by uvicorn in this process (so a bug can be planted with monkeypatch)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(), port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_500_keeps_the_connection(monkeypatch, live_app):
    """The bug stops at the app: the server neither logs it again nor closes the socket, so
    the next request goes out on the same connection."""

    def failing(cfg, chunk_bytes, cancel=None, traces=None):
        return {}["w9"]

    monkeypatch.setattr(pipeline, "run", failing)
    conn = http.client.HTTPConnection("127.0.0.1", live_app, timeout=30)
    headers = {"Content-Type": "application/json"}
    conn.request("POST", "/api/run", body='{"batch": 2, "in_features": 3}', headers=headers)
    r = conn.getresponse()
    assert r.status == 500 and b"KeyError" in r.read()
    assert (r.getheader("connection") or "").lower() != "close"
    sock = conn.sock
    conn.request("GET", "/healthz", headers=headers)
    again = conn.getresponse()
    assert again.status == 200 and again.read() == b'{"status":"ok"}'
    assert conn.sock is sock  # not reconnected
    conn.close()


# --------------------------------------------------------------------------- the fuzz

# 0-d and 1-d starting points: x.sum() (), x[0, 0] (), x.sum(0) (3,), b1 (2,), target (4,)
BASES = ["x.sum()", "x[0, 0]", "x.sum(0)", "b1", "target", "l1.g.sum()", "x[0]"]
DIMS = st.sampled_from([-3, -2, -1, 0, 1, 2])
KEEP = st.sampled_from(["", ", keepdim=True"])


def _call(name: str):
    return st.builds(lambda d, k: f".{name}({d}{k})", DIMS, KEEP)


OPS = st.one_of(
    *(_call(n) for n in ("sum", "mean", "amax", "amin", "max", "min")),
    st.builds(lambda d, e: f".sum(({d}, {e}))", DIMS, DIMS),
    st.builds(lambda d: f".sum(({d},))", DIMS),
    st.sampled_from([".sum()", ".mean()", ".max()", ".min()", ".squeeze()", ".t()", ".T"]),
    st.sampled_from([".reshape(-1)", ".view(-1)", ".reshape(1, -1)", "[None]", "[...]"]),
    st.builds(lambda d: f".softmax({d})", DIMS),
    st.builds(lambda d: f".log_softmax({d})", DIMS),
    st.builds(lambda d: f".unsqueeze({d})", DIMS),
    st.builds(lambda d: f".squeeze({d})", DIMS),
    st.builds(lambda d, e: f".transpose({d}, {e})", DIMS, DIMS),
    st.builds(lambda d: f".permute({d})", DIMS),
    st.builds(lambda i: f"[{i}]", DIMS),
    st.builds(lambda i: f"[..., {i}]", DIMS),
    st.builds(lambda i, j: f"[{i}:{j}]", DIMS, DIMS),
    st.builds(lambda d: f".size({d})", DIMS),
    st.builds(lambda n: f".expand({n})", st.sampled_from([1, 2, 3, -1])),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(BASES), st.lists(OPS, min_size=1, max_size=4))
def test_fuzz_reductions_indexing_and_dims_on_small_tensors(client, base, ops):
    """Only a 200 or the learner's 422 at its key: a 5xx, a 503 or a 422 anywhere else (the
    one a catch-all would make of an engine error) fails."""
    expr = base + "".join(ops)
    r = post(client, {"x.g": f"v = {expr}\nv * 0 + {XG}"})
    if r.status_code != 200:
        assert_at_key(r, "x.g")
