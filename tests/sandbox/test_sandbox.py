"""The program sandbox keeps its promises (issue 28): programs run in worker processes under a
hard memory limit and a deadline on their own CPU clock; a worker that overruns or is killed
costs that program, never the server. Each finding of the probe (N1-N13) has a test here."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.ops.cancel import CancelToken
from app.programs.schemas import ProgramRequest
from app.settings import Settings
from tests.scripts import run_script

# a 500 must fail an assertion, not the request
pytestmark = pytest.mark.app_settings(raise_server_exceptions=False)

SQUARE = {
    "inputs": {"x": {"shape": [4, 3]}},
    "forward": "y = x * x\nloss = y.sum()",
    "backward": "dy = torch.ones_like(y)\ndx = 2 * x * dy",
}
# a program whose real run takes seconds: the same matmul, many times over
SLOW = {
    "inputs": {"a": {"shape": [256, 256]}},
    "forward": "loss = (a @ a).sum()",
    "backward": "s = a\nfor i in range(1000):\n    s = torch.tanh(s @ a)\nda = s",
}


def post(client, body: dict):
    return client.post("/api/program", json=body)


def test_a_program_runs_in_a_worker_process_not_the_server(client):
    r = post(client, SQUARE)
    assert r.status_code == 200, r.text[:300]
    assert r.json()["check"]["all_close"]
    sandbox = client.app.state.sandbox
    pids = sandbox.idle_pids()
    assert pids and os.getpid() not in pids


def test_the_body_is_validated_in_the_worker_not_on_the_event_loop(client, monkeypatch):
    """N4: a program body is never decoded or validated by the serving process. Breaking
    the model's validation here changes nothing: the worker (another process) validates."""

    def refuse(*args, **kwargs):
        raise AssertionError("the serving process validated a program body")

    monkeypatch.setattr(ProgramRequest, "model_validate", refuse)
    monkeypatch.setattr(ProgramRequest, "model_validate_json", refuse)
    r = post(client, SQUARE)
    assert r.status_code == 200, r.text[:300]


def test_invalid_bodies_are_the_same_422s_as_before(client):
    r = client.post(
        "/api/program", content=b'{"inputs": ', headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert error["type"] == "json_invalid" and error["loc"][0] == "body"
    r = post(client, {**SQUARE, "extra": 1})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "extra"]


def test_n1_a_stretched_view_whose_gradient_autograd_makes_is_refused(client):
    """N1: `expand` costs nothing, but autograd makes its gradient whole: (40000, 64, 64)
    floats are 655 MB. Refused, at the line or by the worker's hard limit: never a 200 that
    grew the server."""
    settings = Settings(memory_budget_bytes=256 << 20)
    body = {
        "inputs": {"x": {"shape": [64, 64]}},
        "forward": "y = x.unsqueeze(0).expand(40000, 64, 64)\nloss = y.sum()",
        "backward": "dx = torch.ones_like(x) * 40000",
    }
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        r = post(c, body)
        assert r.status_code == 422, r.text[:300]
        assert "memory" in r.text
        assert post(c, SQUARE).status_code == 200


def test_the_hard_memory_limit_holds_where_the_estimate_lets_a_program_through(client):
    """A hard limit that does not depend on the estimates: with a worker limit of 64 MiB
    past its start (the estimate's budget 8 GiB), a program that really allocates
    64 MB (a (4000, 4000) broadcast product) is stopped by the OS limit: a 422 naming it,
    and the next program runs."""
    settings = Settings(worker_memory_bytes=64 << 20, memory_budget_bytes=8 << 30)
    body = {
        "inputs": {"x": {"shape": [1, 4000]}, "w": {"shape": [4000, 1]}},
        "forward": "y = w * x\nloss = y.sum()",
        "backward": "dy = torch.ones_like(y)\ndx = (dy * w).sum(0, keepdim=True)",
    }
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        r = post(c, body)
        assert r.status_code == 422, r.text[:300]
        (error,) = r.json()["detail"]
        assert error["type"] == "memory_limit"
        assert "BROADPROP_WORKER_MEMORY_BYTES" in error["msg"]
        assert post(c, SQUARE).status_code == 200
        assert c.get("/healthz").status_code == 200


def test_n3_a_long_running_program_stops_at_its_deadline_with_a_program_message():
    """N3, N11: a long loop is stopped at the deadline, whatever the program's length, and
    the message names what a program can change (no compare or fd_samples here)."""
    with TestClient(create_app(Settings(run_deadline_s=0.1)), raise_server_exceptions=False) as c:
        started = time.monotonic()
        r = post(c, SLOW)
        took = time.monotonic() - started
        assert r.status_code in (422, 503), r.text[:300]
        if r.status_code == 422:
            (error,) = r.json()["detail"]
            assert "BROADPROP_RUN_DEADLINE_S" in error["msg"]
            assert "compare" not in error["msg"] and "fd_samples" not in error["msg"]
            assert "loop" in error["msg"]
        assert took < 30  # the wall limit is 1.1 s; this only catches a hang
        assert post(c, SQUARE).status_code == 200


def test_a_worker_killed_mid_run_costs_that_program_only(client):
    """A worker killed while it runs (as the OS would at a limit): the program gets a 422
    naming the limit, the server answers /healthz and the next program, and the worker is
    replaced."""
    sandbox = client.app.state.sandbox
    replaced = sandbox.replaced
    answers: dict = {}

    def run_slow() -> None:
        answers["slow"] = post(client, SLOW)

    thread = threading.Thread(target=run_slow)
    thread.start()
    deadline = time.monotonic() + 60
    while not sandbox.busy_pids() and time.monotonic() < deadline:
        time.sleep(0.01)
    (pid,) = sandbox.busy_pids()
    time.sleep(0.2)  # inside its run
    assert client.get("/healthz").status_code == 200  # the server answers meanwhile
    os.kill(pid, signal.SIGKILL)
    thread.join(60)
    r = answers["slow"]
    assert r.status_code == 422, r.text[:300]
    assert r.json()["detail"][0]["type"] == "memory_limit"
    assert sandbox.replaced == replaced + 1
    assert post(client, SQUARE).status_code == 200
    assert pid not in sandbox.idle_pids()


def test_n6_a_scalar_input_runs(client):
    body = {
        "inputs": {"x": {"shape": []}},
        "forward": "loss = x * x",
        "backward": "dx = 2 * x",
    }
    r = post(client, body)
    assert r.status_code == 200, r.text[:300]
    assert r.json()["check"]["all_close"]


def test_n6_a_scalar_input_trains(client):
    body = {"program": {"inputs": {"x": {"shape": []}}, "forward": "loss = x * x",
                        "backward": "dx = 2 * x"}, "steps": 5, "lr": 0.1}  # fmt: skip
    r = client.post("/api/program/train", json=body)
    assert r.status_code == 200
    assert "event: done" in r.text and "event: error" not in r.text


def test_n7_names_rows_beyond_the_data_are_a_422_at_rows(client):
    body = {
        "inputs": {"X": {"data": "names", "field": "X", "rows": 40000}, "C": {"shape": [27, 2]}},
        "forward": "emb = C[X]\nloss = emb.sum()",
        "backward": "",
    }
    r = post(client, body)
    assert r.status_code == 422, r.text[:300]
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "inputs", "X"]
    assert "training rows" in error["msg"]


def test_n8_an_error_after_the_first_deadline_poll_keeps_its_message(client):
    """N8: an index out of range found only on real data (randint values) is a 422 with
    the index error, never a false 'still going after 3 s'."""
    body = {
        "inputs": {"x": {"shape": [4]}, "i": {"shape": [50], "init": "randint", "high": 100}},
        "forward": "y = x[i]\nloss = y.sum()",
        "backward": "dx = torch.ones_like(x)",
    }
    r = post(client, body)
    assert r.status_code == 422, r.text[:300]
    message = r.json()["detail"][0]["msg"]
    assert "out of bounds" in message or "index" in message
    assert "still going" not in message


def test_n8_a_poll_from_another_thread_never_sets_the_deadline():
    token = CancelToken()
    token.arm(0.01)
    box: dict = {}

    def run() -> None:
        box["first"] = token.is_set()  # the run's thread: its clock starts here

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    # this thread has used far more than 0.01 s of CPU since it started (the whole suite)
    spent = time.thread_time()
    while time.thread_time() - spent < 0.05:
        pass
    assert token.is_set() is False and not token.was_set() and box["first"] is False


def test_n9_a_diverging_training_ends_done_diverged_not_error(client):
    presets = {p["id"]: p for p in client.get("/api/programs").json()}
    body = {"program": presets["makemore"]["request"], "steps": 50, "lr": 100.0,
            "eval_every": 5}  # fmt: skip
    r = client.post("/api/program/train", json=body)
    assert r.status_code == 200
    assert "event: error" not in r.text, r.text[-500:]
    done = r.text.split("event: done")[1]
    assert '"stopped":"diverged"' in done


def test_n5_program_trainings_share_the_training_bound():
    """N5: at most `trainings` at once (2 per run slot); one more is a 503 with Retry-After."""
    settings = Settings(max_concurrent_runs=1, torch_threads=1)
    body = {"program": SQUARE, "steps": 20000, "lr": 0.0001}
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        limit = c.app.state.limiter.trainings
        streams = [c.stream("POST", "/api/program/train", json=body) for _ in range(limit)]
        responses = [s.__enter__() for s in streams]
        try:
            assert all(r.status_code == 200 for r in responses)
            extra = c.post("/api/program/train", json=body)
            assert extra.status_code == 503
            assert "retry-after" in extra.headers
        finally:
            for s in streams:
                s.__exit__(None, None, None)


def test_n1_the_estimate_counts_a_views_gradient_at_its_line(client):
    """The estimate refuses the stretched view at the line that names it (before anything
    real runs), saying that autograd makes a view's gradient whole."""
    body = {
        "inputs": {"x": {"shape": [64, 64]}},
        "forward": "y = x.unsqueeze(0).expand(100000, 64, 64)\nloss = y.sum()",
        "backward": "",
    }
    r = post(client, body)
    assert r.status_code == 422, r.text[:300]
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "forward", 1]
    assert "gradient of `y`" in error["msg"] and "whole" in error["msg"]


def test_n2_inputs_gradients_are_counted():
    """Ten inputs of 2^24 floats: 640 MiB of values and as much again of gradients, over a
    1 GiB budget: refused at an input, not a 200 that took 1.4 GB."""
    inputs = {f"x{i}": {"shape": [1 << 24]} for i in range(10)}
    body = {
        "inputs": inputs,
        "forward": "loss = " + " + ".join(f"x{i}.sum()" for i in range(10)),
        "backward": "",
    }
    with TestClient(create_app(), raise_server_exceptions=False) as c:
        r = post(c, body)
    assert r.status_code == 422, r.text[:300]
    (error,) = r.json()["detail"]
    assert error["loc"][:2] == ["body", "inputs"] and "budget" in error["msg"]


def test_n11_a_budget_left_is_never_negative_in_a_message(client):
    body = {
        "inputs": {"x": {"shape": [3000, 3000]}, "w": {"shape": [3000, 3000]}},
        "forward": "a = x * w\nb = a * w\nc = b * w\nd = c * w\ne = d * w\nloss = e.sum()",
        "backward": "",
    }
    with TestClient(create_app(Settings(memory_budget_bytes=300 << 20)),
                    raise_server_exceptions=False) as c:  # fmt: skip
        r = post(c, body)
    assert r.status_code == 422, r.text[:300]
    message = r.json()["detail"][0]["msg"]
    assert "budget" in message and re.search(r"-\d", message) is None, message


@pytest.mark.parametrize("line", ["torch = x", "F = x * 2", "dx, len = x.max(0)", "range = 3"])
def test_n10_a_module_or_builtin_is_never_rebound(client, line):
    """N10: Python would rebind `torch`, the server would not; neither does: a 422 at the
    line, in both texts."""
    body = {**SQUARE, "backward": line + "\n" + SQUARE["backward"]}
    r = post(client, body)
    assert r.status_code == 422, r.text[:300]
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "backward", 1] and "something else" in error["msg"]


def test_n10_the_export_stops_where_the_server_stops(client, tmp_path):
    """N10: a backward that stops at a shape error: the server checks the lines before it;
    the exported script says the same line cannot run, checks the same gradients, exits 1."""

    body = {
        "inputs": {"x": {"shape": [4, 3]}, "w": {"shape": [3, 2]}},
        "forward": "h = x @ w\nloss = h.sum()",
        "backward": "dh = torch.ones_like(h)\ndw = x.T @ dh\ndx = dh @ w\n",
    }
    answer = post(client, body).json()
    assert answer["backward_error"]["line"] == 3
    written = sorted(n for n, row in answer["check"]["tensors"].items() if row["written"])
    script = client.post("/api/export", json={"program": body, "format": "py"})
    assert script.status_code == 200
    path = tmp_path / "program.py"
    path.write_text(script.text)
    run = run_script([path], timeout=120)
    assert run.returncode == 1, run.stderr[-500:]
    assert "backward line 3 cannot run" in run.stdout
    checked = sorted(line.split()[0] for line in run.stdout.splitlines() if " exact: " in line)
    assert checked == written == ["h", "w"]


def test_n12_follow_on_a_wrong_formula_says_whose_terms_it_shows(client):
    """N12: with `w1.g` replaced by a wrong formula (twice the right one), follow's terms are
    the built-in formula's: the answer says what they add up to and that the learner's value
    differs, instead of terms that seem not to add up to the value shown."""
    body = {"batch": 4, "in_features": 3, "hidden": [2], "formulas": {"w1.g": "2 * (x.T @ l1.g)"},
            "follow": {"grad": "w1.g", "index": [0, 0]}}  # fmt: skip
    r = client.post("/api/run", json=body)
    assert r.status_code == 200, r.text[:300]
    f = r.json()["follow"]
    assert f["source"] == "user" and f["agrees"] is False
    assert f["formula_value"] == pytest.approx(f["sum"])
    assert f["value"] == pytest.approx(2 * f["sum"], rel=1e-5)
    assert "your formula gives" in f["note"]
    body["formulas"] = {"w1.g": "x.T @ l1.g"}
    f = client.post("/api/run", json=body).json()["follow"]
    assert f["agrees"] is True and "note" not in f


@pytest.mark.parametrize("call", ["torch.sum()", "torch.exp()", "F.softmax()"])
def test_n11_a_call_with_missing_arguments_never_names_our_own_functions(client, call):
    body = {"inputs": {"x": {"shape": [3]}}, "forward": f"y = {call}\nloss = x.sum()",
            "backward": ""}  # fmt: skip
    r = post(client, body)
    assert r.status_code == 422
    message = r.json()["detail"][0]["msg"]
    assert "Traced" not in message and "self" not in message and "lambda" not in message
    assert "arguments do not fit" in message and "the tensor" in message


def test_the_forkserver_starts_before_the_servers_imports_and_serves_the_workers():
    """`python -m app` starts the sandbox's forkserver first (app/__main__.py): its preload
    (torch, the interpreter) then runs beside the server's own imports. Starting it imports
    nothing heavy here, and the pool's workers are then forked from it."""
    code = (
        "import sys, os\n"
        "from multiprocessing import forkserver\n"
        "from app.sandbox.pool import Worker, start_forkserver\n"
        "start_forkserver()\n"
        "pid = forkserver._forkserver._forkserver_pid\n"
        "print('torch' in sys.modules, pid is not None and os.path.exists(f'/proc/{pid}'))\n"
        "worker = Worker().wait_ready()\n"
        "with open(f'/proc/{worker.pid}/stat') as f:\n"
        "    parent = int(f.read().rsplit(')', 1)[1].split()[1])\n"
        "print(parent == pid)\n"
        "worker.kill()\n"
    )
    root = Path(__file__).resolve().parents[2]
    # a new interpreter (not tests/scripts.py's fork of a warm one, which has torch loaded)
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True", "True"]
    main = (root / "app" / "__main__.py").read_text()
    assert main.index("start_forkserver()") < main.index("from app.server.startup import")


def test_a_taken_port_ends_the_server_with_the_bind_error_and_nothing_else():
    """`python -m app` on a port another process holds: uvicorn's bind error, exit code 3, and
    no traceback from sandbox workers that were starting meanwhile (their server gone)."""
    root = Path(__file__).resolve().parents[2]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**os.environ, "BROADPROP_HOST": "127.0.0.1",
               "BROADPROP_PORT": str(taken.getsockname()[1])}  # fmt: skip
        out = subprocess.run([sys.executable, "-m", "app"], cwd=root, env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    said = out.stdout + out.stderr
    assert out.returncode != 0 and "address already in use" in said
    assert "Traceback" not in said, said[-2000:]
