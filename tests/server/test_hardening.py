"""Hardening (issue 6): malformed requests get 4xx and never 5xx (their speed is measured in
benchmarks/load.py); the body limit; the run
limiter (503 + Retry-After, /healthz free during load); errors mapped (our bugs 500); strict JSON
for exploding runs; offline /docs; settings from the environment."""

from __future__ import annotations

import copy
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import anyio
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.runs import pipeline
from app.schemas import RunRequest, RunResponse
from app.server.body import BodyLimitMiddleware
from app.server.lanes import derive_concurrency
from app.settings import Settings

# a client that shows server errors as responses (a 5xx must fail the assertion, not the request)
pytestmark = pytest.mark.app_settings(raise_server_exceptions=False)

JSON = {"content-type": "application/json"}


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


MALFORMED: dict[str, tuple[bytes, dict[str, str]]] = {
    # wrong types
    "batch as string": (b'{"batch": "10"}', JSON),
    "batch as float": (b'{"batch": 10.0}', JSON),
    "batch as bool": (b'{"batch": true}', JSON),
    "batch list of strings": (b'{"batch": ["4", "4"]}', JSON),
    "hidden as int": (b'{"hidden": 50}', JSON),
    "hidden of floats": (b'{"hidden": [50.5]}', JSON),
    "seed as float": (b'{"seed": 1.5}', JSON),
    "seed as string": (b'{"seed": "0"}', JSON),
    "dtype as int": (b'{"dtype": 3}', JSON),
    "unknown activation": (b'{"activation": "gelu"}', JSON),
    "unknown strategy": (b'{"strategy": "fft"}', JSON),
    "init_scale as string": (b'{"init_scale": "big"}', JSON),
    # negatives and zeros
    "batch negative": (b'{"batch": -1}', JSON),
    "batch zero": (b'{"batch": 0}', JSON),
    "batch dim negative": (b'{"batch": [4, -4]}', JSON),
    "seed negative": (b'{"seed": -1}', JSON),
    "hidden negative": (b'{"hidden": [-5]}', JSON),
    "in_features zero": (b'{"in_features": 0}', JSON),
    "max_cells zero": (b'{"max_cells": 0}', JSON),
    "fd_samples negative": (b'{"fd_samples": -1}', JSON),
    # huge
    "seed 2^63": (b'{"seed": 9223372036854775808}', JSON),
    "seed 2^64 + 1": (b'{"seed": 18446744073709551617}', JSON),
    "seed 10^30": (b'{"seed": 1000000000000000000000000000000}', JSON),
    "batch 10^12": (b'{"batch": 1000000000000}', JSON),
    "batch dims multiply too far": (b'{"batch": [1000, 1000, 1000]}', JSON),
    "batch too many dims": (b'{"batch": [1, 1, 1, 1, 1]}', JSON),
    "batch empty list": (b'{"batch": []}', JSON),
    "hidden width 10^6": (b'{"hidden": [1000000]}', JSON),
    "hidden too deep": (b'{"hidden": [4, 4, 4, 4, 4, 4, 4, 4, 4]}', JSON),
    "max_cells 10^7": (b'{"max_cells": 10000000}', JSON),
    "init_scale 1e308": (b'{"init_scale": 1e308}', JSON),
    "init_scale 1e400 (inf)": (b'{"init_scale": 1e400}', JSON),
    "over the memory budget": (b'{"batch": 1000000, "hidden": [4096]}', JSON),
    # NaN / Infinity literals (not JSON, but Python's parser takes them)
    "init_scale NaN": (b'{"init_scale": NaN}', JSON),
    "init_scale Infinity": (b'{"init_scale": Infinity}', JSON),
    "init_scale -Infinity": (b'{"init_scale": -Infinity}', JSON),
    "seed NaN": (b'{"seed": NaN}', JSON),
    "batch Infinity": (b'{"batch": Infinity}', JSON),
    "hidden [NaN]": (b'{"hidden": [NaN]}', JSON),
    # not JSON
    "plain text": (b"not json", JSON),
    "truncated object": (b'{"batch": ', JSON),
    "trailing comma": (b'{"batch": 10,}', JSON),
    "single quotes": (b"{'batch': 10}", JSON),
    "invalid utf-8": (b"\xff\xfe\xfd", JSON),
    "binary junk": (bytes(range(256)), JSON),
    # not an object
    "top-level list": (b"[1, 2]", JSON),
    "top-level string": (b'"batch"', JSON),
    "top-level number": (b"42", JSON),
    # wrong content type
    "text/plain": (b'{"batch": 10}', {"content-type": "text/plain"}),
    "form-encoded": (b"batch=10", {"content-type": "application/x-www-form-urlencoded"}),
    "xml": (b"<batch>10</batch>", {"content-type": "application/xml"}),
    # huge nesting
    "nested 10k deep": (nested(10_000), JSON),
    "nested 10k deep in a field": (b'{"hidden": ' + nested(10_000) + b"}", JSON),
    "nested 900 deep in a field": (b'{"hidden": ' + nested(900) + b"}", JSON),
    "nested 300 deep unknown field": (b'{"zzz": ' + nested(300) + b"}", JSON),
    "nested objects 5k deep": (b'{"a":' * 5000 + b"1" + b"}" * 5000, JSON),
    # unknown fields
    "unknown field": (b'{"foo": 1}', JSON),
    "wrong case": (b'{"Batch": 10}', JSON),
    "many unknown fields": (json.dumps({f"k{i}": i for i in range(2000)}).encode(), JSON),
}


@pytest.mark.parametrize("route", ["/api/run", "/api/broadcast"])
@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_request_gets_4xx(client, route, name):
    body, headers = MALFORMED[name]
    r = client.post(route, content=body, headers=headers)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    json.loads(r.text, parse_constant=_refuse_constant)  # strict JSON, even echoing NaN
    assert "detail" in r.json()


def _refuse_constant(token: str):
    raise AssertionError(f"non-strict JSON token {token}")


def test_nan_literal_is_422_naming_the_field(client):
    r = client.post("/api/run", content=b'{"init_scale": NaN}', headers=JSON)
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "init_scale"]
    assert error["input"] is None  # NaN echoed as null


def test_invalid_enum_with_fd_samples_is_422_naming_the_field(client):
    r = client.post("/api/run", json={"loss": "bogus", "fd_samples": 1})
    assert r.status_code == 422, r.text[:300]
    locs = [error["loc"] for error in r.json()["detail"]]
    assert ["body", "loss"] in locs, locs


def test_huge_seed_is_422_with_the_limit(client):
    r = client.post("/api/run", content=b'{"seed": 18446744073709551617}', headers=JSON)
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "seed"]
    assert error["ctx"]["le"] == 2**63 - 1


def test_undecodable_body_is_422_json_invalid(client):
    for body in (b"\xff\xfe\xfd", nested(10_000)):
        r = client.post("/api/run", content=body, headers=JSON)
        assert r.status_code == 422
        assert r.json()["detail"][0]["type"] == "json_invalid"


def test_seed_limits_accepted(client):
    small = {"batch": 2, "in_features": 3, "hidden": [2]}
    for seed in (0, 2**63 - 1):
        r = client.post("/api/run", json={**small, "seed": seed})
        assert r.status_code == 200, r.text[:300]
        assert r.json()["config"]["seed"] == seed


def test_over_budget_names_field_and_budget(client):
    r = client.post("/api/run", json={"batch": 1_000_000, "in_features": 784})
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "batch"]
    assert "memory budget" in error["msg"] and "BROADPROP_MEMORY_BUDGET_BYTES" in error["msg"]
    assert error["ctx"]["estimated_bytes"] > error["ctx"]["budget_bytes"]


def test_openapi_shows_the_limits(client):
    props = client.get("/openapi.json").json()["components"]["schemas"]["RunRequest"]
    props = props["properties"]
    assert props["seed"]["maximum"] == 2**63 - 1 and props["seed"]["minimum"] == 0
    assert props["hidden"]["maxItems"] == 8
    assert props["max_cells"]["maximum"] == 1_000_000
    assert "maximum" in props["init_scale"] and "minimum" in props["init_scale"]


# --- body size ------------------------------------------------------------------------------


def small_limit_client(**settings) -> TestClient:
    return TestClient(create_app(Settings(**settings)), raise_server_exceptions=False)


def test_body_over_limit_is_413():
    client = small_limit_client(max_body_bytes=4096)
    r = client.post("/api/run", content=b" " * 5000, headers=JSON)
    assert r.status_code == 413
    assert "BROADPROP_MAX_BODY_BYTES" in r.json()["detail"]
    # the same body within the limit is read normally
    r = client.post(
        "/api/run", content=b'{"batch": 2, "in_features": 3}' + b" " * 4000, headers=JSON
    )
    assert r.status_code == 200


def test_chunked_body_over_limit_is_413():
    client = small_limit_client(max_body_bytes=4096)
    chunks = (b" " * 1024 for _ in range(64))  # no Content-Length: sent chunked
    r = client.post("/api/run", content=chunks, headers=JSON)
    assert r.status_code == 413


def test_body_limit_stops_reading_early():
    """At the ASGI level: a Content-Length over the limit is refused before any read, and a
    chunked body is refused as soon as its chunks pass the limit."""

    async def app(scope, receive, send):  # pragma: no cover - must never be reached
        raise AssertionError("the app got an oversized body")

    def drive(headers: list[tuple[bytes, bytes]]) -> tuple[int, int]:
        reads = 0
        sent: list[dict] = []

        async def receive():
            nonlocal reads
            reads += 1
            return {"type": "http.request", "body": b"x" * 1024, "more_body": True}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/api/run", "headers": headers}
        limited = BodyLimitMiddleware(app, max_bytes=4096)
        # a thread of its own: the browser tests' sync Playwright keeps a loop on this one
        with ThreadPoolExecutor(1) as pool:
            pool.submit(anyio.run, limited, scope, receive, send).result()
        return sent[0]["status"], reads

    assert drive([(b"content-length", b"1000000000")]) == (413, 0)
    status, reads = drive([(b"transfer-encoding", b"chunked")])
    assert (status, reads) == (413, 5)  # 5 KiB read of an endless body, then refused


# --- the limiter ----------------------------------------------------------------------------


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("runs,threads", [(0, 0), (2, 0), (0, 2), (3, 0)])
def test_derived_concurrency_fits_the_cores(cores, runs, threads):
    c = derive_concurrency(Settings(max_concurrent_runs=runs, torch_threads=threads), cores)
    assert c.runs >= 1 and c.torch_threads >= 1
    if runs:
        assert c.runs == runs
    if threads:
        assert c.torch_threads == threads
    if not (runs and threads) and runs <= cores and threads <= cores:
        assert c.runs * c.torch_threads <= cores


class Blocker:
    """Stands in for pipeline.run: blocks until released, so a run slot stays taken."""

    def __init__(self) -> None:
        self.started = threading.Semaphore(0)
        self.release = threading.Event()

    def __call__(self, cfg, chunk_bytes, cancel=None, traces=None):
        self.started.release()
        assert self.release.wait(10)
        return {"loss": 0.0, "gradients": {}}


def test_saturated_server_gives_503_with_retry_after_and_healthz_answers(monkeypatch):
    """One slot in each lane: a small run takes either lane, so two block them both; a third
    waits the queue wait and gets 503."""
    blocker = Blocker()
    app = create_app(Settings(max_concurrent_runs=1, queue_wait_s=0.2, run_deadline_s=30))
    with TestClient(app, raise_server_exceptions=False) as client:  # warm-up: the real run
        monkeypatch.setattr(pipeline, "run", blocker)
        first: list = []
        workers = [
            threading.Thread(target=lambda: first.append(client.post("/api/run", json={})))
            for _ in range(2)
        ]
        for worker in workers:
            worker.start()
        try:
            assert blocker.started.acquire(timeout=10) and blocker.started.acquire(timeout=10)
            assert client.get("/healthz").json() == {"status": "ok"}  # loop not blocked
            r = client.post("/api/run", json={})
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            assert "busy" in r.json()["detail"]
            # a run over the budget is refused at once, without waiting for a slot
            r = client.post("/api/run", json={"batch": 1_000_000, "in_features": 784})
            assert r.status_code == 422
        finally:
            blocker.release.set()
            for worker in workers:
                worker.join(10)
    assert [r.status_code for r in first] == [200, 200]


@pytest.mark.parametrize(
    "error,status",
    [
        (MemoryError(), 503),
        (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate"), 503),
        (RuntimeError("something broke"), 500),
        (ValueError("an engine error"), 500),
        (KeyError("w9"), 500),
    ],
)
def test_errors_in_a_run_are_mapped(monkeypatch, error, status):
    """Out of memory is busy (503); any other error in the engine is our own bug: a 500 (not
    a 422 at the body, which would blame the client), without its traceback."""

    def failing(cfg, chunk_bytes, cancel=None, traces=None):
        raise error

    monkeypatch.setattr(pipeline, "run", failing)
    client = TestClient(create_app(), raise_server_exceptions=False)
    r = client.post("/api/run", json={"batch": 2, "in_features": 3})
    assert r.status_code == status
    assert r.json()["detail"] and "Traceback" not in r.text
    if status == 503:
        assert int(r.headers["retry-after"]) >= 1


# --- strict JSON ----------------------------------------------------------------------------


def test_exploding_run_is_strict_json_with_counts_and_warnings(client):
    r = client.post("/api/run", json={"init_scale": 1e6, "hidden": [50, 50, 50]})
    assert r.status_code == 200
    body = json.loads(r.text, parse_constant=_refuse_constant)
    assert body["loss"] is None
    grads = body["gradients"]
    assert sum(g["nonfinite"] for g in grads.values()) > 0
    for name, g in grads.items():
        if g["nonfinite"]:
            assert any(w.startswith(f"overflow in {name}.g") for w in body["warnings"])
    assert "overflow in loss: it is not finite (sent as null)" in body["warnings"]
    assert body["check"]["all_close"] in (True, False)


def test_overflow_response_matches_the_response_schema(client):
    body = {"hidden": [50] * 8, "init_scale": 1e6, "batch": 16, "in_features": 8}
    r = client.post("/api/run", json=body)
    assert r.status_code == 200, r.text[:300]
    assert r.json()["warnings"]  # it did overflow: the nulls below are really exercised
    RunResponse.model_validate(r.json())


def test_clean_run_has_no_warnings(client):
    r = client.post("/api/run", json={"batch": 4, "in_features": 3})
    assert r.status_code == 200
    assert r.json()["warnings"] == []


# --- offline docs ---------------------------------------------------------------------------


def test_docs_use_only_same_origin_assets(client):
    import re

    r = client.get("/docs")
    assert r.status_code == 200
    urls = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert len(urls) >= 4  # css, favicon, js bundle, its starter
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 0
    starter = client.get("/static/js/docs.js").text
    assert 'url: "/openapi.json"' in starter
    assert "validatorUrl: null" in starter  # no badge fetched from validator.swagger.io
    assert client.get("/docs/assets/../../app/main.py").status_code == 404


# --- determinism and shared state -----------------------------------------------------------


def test_cached_traces_are_never_mutated(client):
    cfg = RunRequest(batch=8, in_features=5, hidden=[4, 3])
    before = copy.deepcopy(pipeline.trace(cfg))
    for _ in range(2):
        r = client.post("/api/run", json=cfg.model_dump())
        assert r.status_code == 200
    assert pipeline.trace(cfg) == before


# --- settings -------------------------------------------------------------------------------


def test_settings_from_environment(monkeypatch):
    env = {
        "BROADPROP_HOST": "127.0.0.2",
        "BROADPROP_PORT": "8123",
        "BROADPROP_MEMORY_BUDGET_BYTES": str(256 << 20),
        "BROADPROP_MAX_CONCURRENT_RUNS": "3",
        "BROADPROP_TORCH_THREADS": "1",
        "BROADPROP_MAX_BODY_BYTES": "2048",
        "BROADPROP_QUEUE_WAIT_S": "0.5",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = Settings()
    assert (s.host, s.port, s.memory_budget_bytes) == ("127.0.0.2", 8123, 256 << 20)
    assert (s.max_concurrent_runs, s.torch_threads) == (3, 1)
    assert (s.max_body_bytes, s.queue_wait_s) == (2048, 0.5)
    app = create_app(s)
    assert app.state.limiter.slots == 3
    assert app.state.concurrency.torch_threads == 1


def test_default_host_is_loopback(monkeypatch):
    monkeypatch.delenv("BROADPROP_HOST", raising=False)
    assert Settings().host == "127.0.0.1"
