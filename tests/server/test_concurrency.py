"""Determinism under load: the same config gives bit-identical answers whether requests come
one at a time or many at once (per-run generators, no shared mutable state)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

# several runs at once, each on one thread, and a long queue wait: no 503 is expected, but the
# limiter's own refusal is allowed (assert_saturated); a 200 must never differ.
pytestmark = [
    pytest.mark.load,
    pytest.mark.app_settings(
        max_concurrent_runs=4, torch_threads=1, queue_wait_s=60, raise_server_exceptions=False
    ),
]

THREADS = 16
# max_cells over every tensor's size: the heatmaps are the gradients themselves, so equal
# JSON means bit-equal gradients (orjson writes the shortest repr that round-trips).
EXACT = {"batch": 64, "in_features": 32, "hidden": [16, 8], "max_cells": 1_000_000}
CONFIGS = [
    {},  # the article's run
    {**EXACT, "seed": 1},
    {**EXACT, "seed": 2, "activation": "tanh", "dtype": "float64"},
    {**EXACT, "seed": 3, "strategy": "einsum", "batch": [4, 16]},
]


def answer(response) -> dict:
    body = response.json()
    body.pop("timing")
    return body


def test_fixture_runs_on_one_thread(client):
    """The premise of restoring the count afterwards: the lifespan (run in TestClient's own
    thread) changed it for every thread started since, the app's workers and pytest's alike."""
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(torch.get_num_threads).result() == 1


def test_simultaneous_runs_are_bit_identical_to_sequential(client):
    sequential = []
    for cfg in CONFIGS:
        r = client.post("/api/run", json=cfg)
        assert r.status_code == 200, r.text[:300]
        sequential.append(answer(r))

    jobs = [i % len(CONFIGS) for i in range(THREADS * 2)]  # configs interleaved
    with ThreadPoolExecutor(THREADS) as pool:
        responses = list(pool.map(lambda i: client.post("/api/run", json=CONFIGS[i]), jobs))

    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= len(jobs) // 2
    for i, r in zip(jobs, responses):
        if r.status_code == 200:
            assert answer(r) == sequential[i]
        else:
            assert_saturated(r)


def assert_saturated(r) -> None:
    """A 503 that says every run slot stayed busy for the queue wait (the limiter refused):
    not any 503, such as one an error in a run could once be answered with."""
    assert r.status_code == 503, r.text[:300]
    assert r.headers.get("retry-after", "").isdigit(), r.headers
    assert r.json()["detail"].startswith("the server is busy: every run slot ("), r.text[:300]


def test_only_the_limiters_503_passes_for_busy(client, monkeypatch):
    """The check above is not blind: a run that fails (a bug: 500) or runs out of memory
    (503, but not busy) is not taken for the limiter's refusal."""
    from app.runs import pipeline

    for error in (KeyError("w9"), MemoryError()):

        def failing(cfg, chunk_bytes, cancel=None, traces=None, error=error):
            raise error

        monkeypatch.setattr(pipeline, "run", failing)
        r = client.post("/api/run", json=CONFIGS[1])
        with pytest.raises(AssertionError):
            assert_saturated(r)


def test_exact_heatmaps_are_the_gradients(client):
    """The premise of the comparison above: with EXACT, z is the whole gradient."""
    body = client.post("/api/run", json={**EXACT, "seed": 1}).json()
    for g in body["gradients"].values():
        assert g["heatmap"]["row_block"] == g["heatmap"]["col_block"] == 1
