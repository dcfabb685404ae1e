"""POST /api/train on a real server: a training holds a run slot, and a client that goes
away stops it (the slot comes free, which happens only once the training thread is done)."""

from __future__ import annotations

import http.client
import json
import time

import pytest

from tests.servers import LiveServer

SMALL_RUN = {"batch": 2, "in_features": 2, "hidden": [2]}
# ~100 s of work at least: only a stop ends it within the test's deadline
LONG = {"data": "mnist", "loss": "cross_entropy", "init": "kaiming", "hidden": [64],
        "strategy": "broadcast", "steps": 20000, "eval_every": 20000}  # fmt: skip


@pytest.fixture(scope="module")
def server():
    """One run slot, no queue wait: any request while a training runs gets 503."""
    live = LiveServer(
        BROADPROP_MAX_CONCURRENT_RUNS="1", BROADPROP_TORCH_THREADS="1", BROADPROP_QUEUE_WAIT_S="0"
    )
    yield live.port
    live.stop()


def post(port: int, path: str, body: dict) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return conn.getresponse()


def first_event(response: http.client.HTTPResponse) -> tuple[str, dict]:
    event = response.readline().decode().strip()
    data = response.readline().decode().strip()
    assert event.startswith("event: ") and data.startswith("data: ")
    return event[7:], json.loads(data[6:])


# estimated over 0.25 s: it needs the large lane's slot, the one a training holds (a run
# estimated under that may take the small lane's, so it never waits behind a training)
LARGE_RUN = {"batch": 20000, "strategy": "matmul"}


def run_status(port: int, body: dict = LARGE_RUN) -> int:
    response = post(port, "/api/run", body)
    response.read()
    return response.status


def test_a_training_holds_its_slot_until_the_client_goes_away(server):
    stream = post(server, "/api/train", LONG)
    assert stream.status == 200
    kind, event = first_event(stream)
    assert kind == "progress" and event["step"] == 1
    assert run_status(server) == 503  # the large lane's one slot is the training's
    assert run_status(server, SMALL_RUN) == 200  # a small run has a lane of its own

    stream.close()  # the client goes away
    deadline = time.monotonic() + 15  # the whole training would take minutes
    while run_status(server) != 200:
        assert time.monotonic() < deadline, "the training went on after the disconnect"
        time.sleep(0.1)


def test_a_training_waits_for_no_one_when_the_slots_are_taken(server):
    """With the slot taken, a second training is a 503 before any stream starts."""
    first = post(server, "/api/train", LONG)
    assert first.status == 200
    first_event(first)
    second = post(server, "/api/train", {"steps": 5})
    assert second.status == 503 and second.getheader("Retry-After")
    assert "busy" in json.loads(second.read())["detail"]
    first.close()
    deadline = time.monotonic() + 15
    while run_status(server) != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
