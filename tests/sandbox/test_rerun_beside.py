"""A small program's float64 rerun made beside its run, in a second sandbox worker lent by the
pool (app/sandbox/pool.py `lend`, app/api/sandboxed.py `_Beside`), its payload sent through a
pipe between the two workers: the answer is the one the run's own worker gives when it reruns
itself, bit for bit; a helper that cannot make the rerun costs nothing but the time; a lent
worker is waited for, never replaced; the server keeps no end of the pipe."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
import types

import anyio
import pytest
import torch
from fastapi.testclient import TestClient

from app.api import sandboxed
from app.lab.allowlist import FormulaError
from app.lab.statements import ProgramError
from app.main import create_app
from app.programs import presets
from app.programs import run as programs_run
from app.programs.outcome import Outcome, outcome_of_payload, rerun_payload
from app.programs.schemas import ProgramRequest
from app.sandbox.pool import Sandbox, WorkerLost, rerun_pipe
from app.sandbox.worker import rerun_from
from app.settings import Settings

MAKEMORE = presets.preset("makemore")["request"]
PROGRAMS = {
    "makemore, the loop": MAKEMORE,
    # a dropped eps: within float32's tolerance, only the float64 rerun calls it suspect
    "a suspect": {
        **MAKEMORE,
        "backward": MAKEMORE["backward"].replace("(bnvar + 1e-5)", "bnvar", 1),
    },  # fmt: skip
    # an index out of range only the real data shows: both runs stop at the last line
    "a stop on real data": {**MAKEMORE, "backward": MAKEMORE["backward"] + "\noops = C[Xb * 10]"},
    "a wrong gradient": {
        **MAKEMORE,
        "backward": MAKEMORE["backward"].replace("dW2 = h.T @ dlogits", "dW2 = 2 * h.T @ dlogits"),
    },  # fmt: skip
    # a small run whose float64 rerun (5.8 MB) is more than its pipe holds: the helper's
    # write waits for the run to read it
    "a rerun bigger than its pipe": {
        "inputs": {"x": {"shape": [4, 600]}, "W": {"shape": [600, 600]}},
        "forward": "h = x @ W\nloss = h.sum()",
        "backward": "dh = torch.ones_like(h)\ndW = x.T @ dh\ndx = dh @ W.T",
    },
}


def _without_timing(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k != "timing"}


@pytest.fixture(scope="module")
def two_threads():
    """An app whose small runs have a spare core (two torch threads a run), so a program's
    rerun is made beside it; and one with one thread, whose worker reruns itself."""
    with (
        TestClient(create_app(Settings(torch_threads=2))) as beside,
        TestClient(create_app(Settings(torch_threads=1))) as alone,
    ):
        yield beside, alone


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_the_rerun_made_beside_gives_the_answer_made_alone(two_threads, name):
    beside, alone = two_threads
    sandbox = beside.app.state.sandbox
    lent, reran = sandbox.lent, sandbox.reran
    answer = beside.post("/api/program", json=PROGRAMS[name])
    assert answer.status_code == 200, answer.text[:300]
    assert (sandbox.lent, sandbox.reran) == (lent + 1, reran + 1)  # made beside, and used
    lent = sandbox.lent
    single = alone.post("/api/program", json=PROGRAMS[name])
    assert sandbox.lent == lent  # one thread a run: no spare, the worker reran itself
    assert _without_timing(answer.json()) == _without_timing(single.json())
    # and the same as this process makes it, with no worker at all
    req = ProgramRequest.model_validate(PROGRAMS[name])
    here = programs_run.run(req, programs_run.admit(req, 2**31, 30.0))
    assert _without_timing(answer.json())["check"] == here["check"]


def test_the_cases_say_what_they_are_for(two_threads):
    beside, _ = two_threads
    checks = {n: beside.post("/api/program", json=p).json() for n, p in PROGRAMS.items()}
    assert checks["makemore, the loop"]["check"]["all_close"]
    suspects = checks["a suspect"]["check"]["suspects"]
    assert "bnvar" in suspects and "W2" not in suspects  # (W2's line comes before the slip)
    assert checks["a stop on real data"]["backward_error"]["line"] == len(
        PROGRAMS["a stop on real data"]["backward"].splitlines())  # fmt: skip
    assert checks["a wrong gradient"]["check"]["first_failure"] == "W2"


def test_a_rerun_travels_with_its_stop_and_its_dtypes():
    error = ProgramError(FormulaError("index 270 is out of bounds", "formula", expr="C[Xb]"), 7,
                         "oops = C[Xb * 10]")  # fmt: skip
    manual = {"w": torch.randn(3, 4, dtype=torch.float64).T, "ids": torch.arange(3)}
    autograd = {"w": torch.randn(4, 3, dtype=torch.float64), "b": torch.ones(2)}
    outcome = Outcome(inputs={}, forward={}, loss=1.5, autograd=autograd, manual=manual,
                      lines={"w": [2, 5]}, spelling={}, helpers={}, error=error)  # fmt: skip
    back = outcome_of_payload(rerun_payload(outcome))
    assert back.loss == 1.5 and back.lines == {"w": [2, 5]}
    assert set(back.manual) == {"w", "ids"} and set(back.autograd) == {"w"}  # only what's read
    for name, t in manual.items():
        assert back.manual[name].dtype == t.dtype and torch.equal(back.manual[name], t)
    assert torch.equal(back.autograd["w"], autograd["w"])
    assert isinstance(back.error, ProgramError)
    assert (str(back.error), back.error.kind, back.error.line, back.error.code) == (
        str(error), "formula", 7, "oops = C[Xb * 10]")  # fmt: skip
    assert back.error.details == {"expr": "C[Xb]"}


def test_a_rerun_numpy_cannot_carry_is_made_by_the_run_itself():
    outcome = Outcome(inputs={}, forward={}, loss=0.0, autograd={},
                      manual={"w": torch.ones(2, dtype=torch.bfloat16)}, lines={}, spelling={},
                      helpers={}, error=None)  # fmt: skip
    assert rerun_payload(outcome) is None


# --------------------------------------------------------------------------- the pool


class _Fake:
    """A worker as the pool and the edge see it, without a process."""

    def __init__(self, name: str, fails: bool = False) -> None:
        self.name, self.fails = name, fails
        self.sent: list[tuple] = []
        self.alive = True
        self.pid = None

    def send(self, message: tuple) -> None:
        if self.fails:
            raise WorkerLost("gone")
        self.sent.append(message)

    def send_with_handle(self, message: tuple, fd: int) -> None:
        self.send(message)
        access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        self.sent.append(("fd", {os.O_RDONLY: "read end", os.O_WRONLY: "write end"}[access]))

    async def receive_on_loop(self, timeout: float | None) -> tuple:
        raise WorkerLost("gone")

    def kill(self, reap: bool = True) -> None:
        self.alive = False


def _pool(*workers: _Fake, size: int | None = None) -> Sandbox:
    """A started pool of fakes (`size` 0: a worker discarded is never replaced by a real one)."""
    sandbox = Sandbox(len(workers) if size is None else size)
    sandbox._started = True
    sandbox._idle.extend(workers)
    return sandbox


def test_a_lent_worker_is_waited_for_not_replaced_by_a_new_one():
    a, b = _Fake("a"), _Fake("b")
    sandbox = _pool(a, b)
    run = sandbox.take()
    helper = sandbox.lend()
    assert {run, helper} == {a, b}
    assert sandbox.lend() is None  # nothing idle: the run reruns itself, no worker is made
    taken: dict = {}
    thread = threading.Thread(target=lambda: taken.setdefault("w", sandbox.take()))
    thread.start()
    time.sleep(0.2)
    assert thread.is_alive()  # waiting for the lent worker, not forking a new one
    sandbox.give(helper)
    thread.join(5)
    assert taken["w"] is helper and sandbox.replaced == 0


class _Http:
    async def receive(self) -> dict:
        await anyio.sleep(60)  # the client stays
        return {"type": "http.request"}


def _told(helper: _Fake, sandbox: Sandbox) -> sandboxed._Beside:
    beside = sandboxed._Beside.lend(_Http(), sandbox, Settings())
    assert beside is not None and beside.worker is helper
    run = _Fake("run")
    beside.connect(run, ("program", b"{}", Settings(), 0.25, True))
    assert [m[0] for m in run.sent] == ["program", "fd"] and run.sent[1][1] == "read end"
    return beside


def test_a_helper_that_cannot_be_told_its_job_is_ended_and_not_used():
    helper = _Fake("helper", fails=True)
    sandbox = _pool(helper, size=0)
    beside = _told(helper, sandbox)
    assert beside.settled and not helper.alive and sandbox.replaced == 1 and not sandbox._lent
    run = sandboxed._Call(_Http(), _Fake("run"), Settings())
    assert anyio.run(beside.done, run) is False  # the run reruns itself


def test_a_helper_is_given_back_whole_when_the_run_cannot_be_told():
    # the run's job goes first: a run worker that cannot hear it leaves the helper untold,
    # and that healthy worker goes back to the pool (not ended and forked again)
    helper = _Fake("helper")
    sandbox = _pool(helper)
    beside = sandboxed._Beside.lend(_Http(), sandbox, Settings())
    with pytest.raises(WorkerLost):
        beside.connect(_Fake("run", fails=True), ("program", b"{}", Settings(), 0.25, True))
    beside.settle()  # (what the edge's error path does)
    assert helper.sent == [] and helper.alive and sandbox._idle == [helper]
    assert sandbox.replaced == 0 and not sandbox._lent


def test_a_helper_lost_mid_rerun_gives_none_and_is_replaced():
    helper = _Fake("helper")  # told its job, then its pipe breaks (receive: WorkerLost)
    sandbox = _pool(helper, size=0)
    beside = _told(helper, sandbox)
    assert [m[0] for m in helper.sent] == ["rerun", "fd"] and helper.sent[1][1] == "write end"
    run = sandboxed._Call(_Http(), _Fake("run"), Settings())
    assert anyio.run(beside.done, run) is False  # the run reruns itself
    assert run.clean and not helper.alive and sandbox.replaced == 1 and not sandbox._lent


def test_a_helper_that_never_answered_is_ended_not_given_back():
    helper = _Fake("helper")
    sandbox = _pool(helper, size=0)
    beside = _told(helper, sandbox)
    beside.settle()  # (the request was cancelled: the helper may be mid-job)
    assert not helper.alive and helper not in sandbox._idle and sandbox.replaced == 1


def test_a_forward_that_fails_on_real_data_costs_no_worker(two_threads):
    # an index past the table only the real data shows: the run's 422 at the line; the
    # helper's rerun stops at the same line and is given back, not replaced
    beside, _ = two_threads
    sandbox = beside.app.state.sandbox
    forward = MAKEMORE["forward"].replace("C[Xb]", "C[Xb * 10]", 1)
    assert forward != MAKEMORE["forward"]
    lent, replaced = sandbox.lent, sandbox.replaced
    r = beside.post("/api/program", json={**MAKEMORE, "forward": forward})
    assert r.status_code == 422, r.text[:300]
    assert r.json()["detail"][0]["loc"][:2] == ["body", "forward"]
    assert sandbox.lent == lent + 1 and sandbox.replaced == replaced
    assert beside.post("/api/program", json=MAKEMORE).status_code == 200


def test_the_run_reads_a_rerun_a_closed_pipe_or_a_cut_one():
    from multiprocessing.connection import Connection

    outcome = Outcome(inputs={}, forward={}, loss=0.5, autograd={"w": torch.ones(3)},
                      manual={"w": torch.ones(3)}, lines={"w": [1]}, spelling={}, helpers={},
                      error=None)  # fmt: skip
    payload = rerun_payload(outcome)
    read_end, write_end = rerun_pipe()
    with Connection(read_end, writable=False) as run, Connection(write_end, readable=False) as w:
        w.send_bytes(payload)  # in one write: the pipe holds it before the run reads
        got = rerun_from(run)
        assert torch.equal(got.manual["w"], outcome.manual["w"]) and got.loss == 0.5
    read_end, write_end = rerun_pipe()
    with Connection(read_end, writable=False) as run:
        os.close(write_end)  # the helper wrote nothing (not needed) and closed its end
        assert rerun_from(run) is None
    read_end, write_end = rerun_pipe()
    with Connection(read_end, writable=False) as run:
        os.write(write_end, len(payload).to_bytes(4, "big") + payload[:100])
        os.close(write_end)  # the helper ended mid-write (killed at its limit)
        assert rerun_from(run) is None


def test_the_server_keeps_no_end_of_a_rerun_pipe(two_threads):
    beside, _ = two_threads
    sandbox = beside.app.state.sandbox
    assert beside.post("/api/program", json=MAKEMORE).status_code == 200
    before, reran = len(os.listdir("/proc/self/fd")), sandbox.reran
    for _ in range(5):
        assert beside.post("/api/program", json=MAKEMORE).status_code == 200
    assert sandbox.reran == reran + 5  # every one made beside, through its own pipe
    assert len(os.listdir("/proc/self/fd")) == before


def test_an_idle_worker_is_taken_on_the_loop_only_when_take_would_not_wait():
    a, b = _Fake("a"), _Fake("b")
    sandbox = _pool(a, b)
    assert sandbox.take_idle() is b and b in sandbox._busy  # the one used last
    a.alive = False
    assert sandbox.take_idle() is None  # a dead one is left to `take`, which replaces it
    a.alive = True
    sandbox._waiting = 1
    assert sandbox.take_idle() is None  # a run already waiting goes first
    sandbox._waiting = 0
    assert sandbox.take_idle() is a
    assert Sandbox(2).take_idle() is None  # not started: `take` starts it


def test_no_pipe_no_helper(monkeypatch):
    def out_of_descriptors() -> tuple[int, int]:
        raise OSError(24, "Too many open files")

    sandbox = _pool(_Fake("helper"))
    monkeypatch.setattr(sandboxed, "rerun_pipe", out_of_descriptors)
    assert sandboxed._Beside.lend(_Http(), sandbox, Settings()) is None
    assert sandbox.lent == 0 and len(sandbox._idle) == 1  # nothing lent, nothing ended


def test_a_worker_killed_from_two_threads_closes_its_pipe_once():
    from app.sandbox.pool import Worker

    class Conn:
        closed, closes = False, 0

        def close(self) -> None:
            time.sleep(0.05)  # (both threads inside at once, without the lock)
            Conn.closes += 1
            self.closed = True

    worker = Worker.__new__(Worker)
    worker.conn = Conn()
    worker.process = types.SimpleNamespace(pid=None, exitcode=0, join=lambda timeout: None)
    worker._closing = threading.Lock()
    threads = [threading.Thread(target=worker.kill) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert Conn.closes == 1


def test_a_run_waiting_for_a_worker_goes_before_a_rerun():
    a, b = _Fake("a"), _Fake("b")
    sandbox = _pool(a, b)
    sandbox.take()
    helper = sandbox.lend()
    taken: dict = {}
    thread = threading.Thread(target=lambda: taken.setdefault("w", sandbox.take()))
    thread.start()
    deadline = time.monotonic() + 5
    while not sandbox._waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sandbox._waiting == 1
    sandbox.give(helper)
    assert sandbox.lend() is None  # the waiting run takes it, never a rerun first
    thread.join(5)
    assert taken["w"] is helper


def test_a_refused_program_reads_the_helpers_refusal_too(two_threads):
    # the helper, started before the run's dry run says no, says no as well and goes back
    beside, _ = two_threads
    sandbox = beside.app.state.sandbox
    lent, reran, replaced = sandbox.lent, sandbox.reran, sandbox.replaced
    r = beside.post(
        "/api/program", json={**MAKEMORE, "forward": MAKEMORE["forward"] + "\nx = nope * 2"}
    )
    assert r.status_code == 422, r.text[:300]
    assert (sandbox.lent, sandbox.reran, sandbox.replaced) == (lent + 1, reran, replaced)
    assert beside.post("/api/program", json=MAKEMORE).status_code == 200


def test_a_float64_program_needs_no_rerun_and_its_helper_answers_at_once(two_threads):
    beside, _ = two_threads
    sandbox = beside.app.state.sandbox
    lent, reran, replaced = sandbox.lent, sandbox.reran, sandbox.replaced
    r = beside.post("/api/program", json={**MAKEMORE, "dtype": "float64"})
    assert r.status_code == 200 and r.json()["check"]["all_close"]
    assert (sandbox.lent, sandbox.reran, sandbox.replaced) == (lent + 1, reran, replaced)


class _SlowAdmission(_Fake):
    """A worker whose admission arrives after the request was cancelled."""

    async def receive_on_loop(self, timeout: float | None) -> tuple:
        await anyio.sleep(0.3)
        return ("admitted", 0.01, 0, True, True, False)


class _Limiter:
    torch_threads, in_flight = 1, 0

    @contextlib.asynccontextmanager
    async def program_slot(self):
        yield

    @contextlib.asynccontextmanager
    async def slot(self, seconds: float):
        yield


def test_a_request_cancelled_before_its_admission_is_read_ends_its_worker():
    # the admission, read only after the cancellation, is lost: the worker
    # (maybe already running, started at once) must never go back to the pool
    worker = _SlowAdmission("run")
    sandbox = _pool(worker, size=0)

    class Http(_Http):
        app = types.SimpleNamespace(state=types.SimpleNamespace(
            settings=Settings(), limiter=_Limiter(), sandbox=sandbox))  # fmt: skip

        async def body(self) -> bytes:
            return b"{}"

    async def main() -> None:
        with anyio.move_on_after(0.1):
            await sandboxed.run_program(Http())

    anyio.run(main)
    assert worker.sent[0][0] == "program"
    assert not worker.alive and worker not in sandbox._idle and sandbox.replaced == 1
