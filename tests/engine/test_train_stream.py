"""POST /api/train on a real server: a training takes turns on a run slot with runs (a
waiting run gets the slot between two slices of steps), trainings at once are bounded, and a
client that goes away stops its training (its place comes free, which happens only once the
training thread is done)."""

from __future__ import annotations

import http.client
import json
import time

import pytest

from tests.servers import LiveServer

# many requests or sockets at once: the slow lane
pytestmark = pytest.mark.load

# ~100 s of work at least: only a stop ends it within the test's deadline; an event every
# 200 steps shows it going on
LONG = {"data": "mnist", "loss": "cross_entropy", "init": "kaiming", "hidden": [64],
        "strategy": "broadcast", "steps": 20000, "eval_every": 200}  # fmt: skip


@pytest.fixture(scope="module")
def server():
    """One run slot (so two trainings at once), one thread; a run waits up to 20 s."""
    live = LiveServer(
        BROADPROP_MAX_CONCURRENT_RUNS="1", BROADPROP_TORCH_THREADS="1", BROADPROP_QUEUE_WAIT_S="20"
    )
    yield live.port
    live.stop()


def post(port: int, path: str, body: dict) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return conn.getresponse()


def first_event(response: http.client.HTTPResponse) -> tuple[str, dict]:
    event = ""
    while not event or event.startswith(":"):  # the blank line after an event; a comment
        event = response.readline().decode().strip()
    data = response.readline().decode().strip()
    assert event.startswith("event: ") and data.startswith("data: ")
    return event[7:], json.loads(data[6:])


# estimated over 0.25 s: it needs the large lane's slot, the one a training steps on
LARGE_RUN = {"batch": 20000, "strategy": "matmul"}


def run_status(port: int, body: dict = LARGE_RUN) -> int:
    response = post(port, "/api/run", body)
    response.read()
    return response.status


def test_a_run_gets_the_slot_while_a_training_streams(server):
    stream = post(server, "/api/train", LONG)
    assert stream.status == 200
    kind, event = first_event(stream)
    assert kind == "progress" and event["step"] == 1
    assert run_status(server) == 200  # between two slices of the training's steps
    kind, event = first_event(stream)
    assert kind == "progress" and event["step"] >= 200  # and the training went on
    stream.close()


def test_trainings_at_once_are_bounded_and_a_client_going_away_frees_its_place(server):
    first, second = post(server, "/api/train", LONG), post(server, "/api/train", LONG)
    assert first.status == second.status == 200
    first_event(first), first_event(second)
    third = post(server, "/api/train", {"steps": 5})
    assert third.status == 503 and third.getheader("Retry-After")
    third.read()
    first.close()  # the client goes away: its training stops within one step
    deadline = time.monotonic() + 15  # the whole training would take minutes
    while True:
        third = post(server, "/api/train", {"steps": 5})
        if third.status == 200:
            break
        third.read()
        assert time.monotonic() < deadline, "the training went on after the disconnect"
        time.sleep(0.1)
    assert first_event(third)[0] == "progress"
    third.close()
    second.close()
