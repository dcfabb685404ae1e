"""A sandbox worker: a process forked from the forkserver (which imported this module, and so
torch and the program interpreter, once), serving one job at a time over a pipe.

Its limits, set here for each job:
- memory: RLIMIT_AS at the worker's own address space after warm-up, plus the job's memory
  budget, plus HEADROOM_BYTES. An allocation past it fails inside torch ("can't allocate"),
  which the worker reports as `memory`, then exits (the pool starts another).
- time: the job's deadline on this process's own CPU clock (every thread of it, torch's
  included, and nothing of any other process), polled between the program's statements and
  ops; the pool kills the process at its wall-clock limit if a poll never comes.

Messages in: ("program", body, settings, go_under_s, beside) (with beside, a pipe's read end
comes with it, SCM_RIGHTS: app/sandbox/messages.py), then ("go", threads) or ("stop",) unless
it started at once; ("rerun", body, settings, max_seconds) with a pipe's write end;
("train", body, settings) then ("go",) and maybe ("stop",). Out: ("ready", pid) once; then
per job ("admitted", seconds, bytes, rerun, started, with_rerun) and ("ok", json bytes), or
("reran", whether it wrote its payload), or ("refused", errors), ("stopped", reason, cpu_s),
("memory", detail), ("error", detail); a training streams ("event", kind, payload) and ends
with ("end",).

On a quiet server a small program starts as soon as it is admitted (`go_under_s`), and its
float64 rerun may run in a second worker, lent by the pool from the start (`beside`): that
worker writes its payload (app/programs/outcome.py `rerun_payload`) into a pipe the server
made between the two and kept no end of, and the first reads it in place of its own rerun
(nothing to read, the pipe closed: it reruns itself). The payload never passes through the
server."""

from __future__ import annotations

import gc
import os
import re
import resource
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import torch

from app.cost.budget import human_bytes
from app.ops.cancel import RunCancelled, is_allocation_failure
from app.refusal import Refused
from app.sandbox import jobs
from app.sandbox.allocator import (
    IDLE_TRIM_S,
    WORKER_TRIM_MIN_BYTES,
    YOUNG_GENERATIONS,
    release_memory,
    tune_allocator,
)
from app.sandbox.messages import receive_with_handles
from app.settings import Settings

HEADROOM_BYTES = 256 << 20  # torch's and Python's own allocations beside the budget's
RECYCLE_GROWTH_BYTES = 256 << 20  # a worker whose RSS stays this far above its start retires
TRAINING_NICENESS = 10  # trainings yield the CPU to interactive runs
GC_THRESHOLD = 20_000  # allocations between the cycle collector's young collections
CLOCK_POLL_S = 0.001  # a deadline's CPU clock is read at most this often (wall time)


def hard_memory_bytes(settings: Settings) -> int:
    """How far a worker's address space may grow past its start during one job."""
    return settings.worker_memory_bytes or settings.memory_budget_bytes + HEADROOM_BYTES


class ProcessDeadline:
    """A cancel token (`is_set()`, polled by the run) that turns set once this process has
    used `cpu_s` of CPU time since it was made: the job's own work, whatever else the machine
    is doing (other processes' time is not counted)."""

    def __init__(self, cpu_s: float) -> None:
        self.cpu_s = cpu_s
        self.start = time.process_time()
        self.reason: str | None = None
        self._next_poll = 0.0  # perf_counter time of the next read of the CPU clock

    def used_s(self) -> float:
        return time.process_time() - self.start

    def set(self, reason: str) -> None:
        self.reason = self.reason or reason

    def is_set(self) -> bool:
        """Polled after every op and between statements (a thousand times in a makemore
        run): the CPU clock (a system call, ~1 us) is read at most every CLOCK_POLL_S of wall
        time (perf_counter: ~60 ns), so the deadline is seen at most that late (times the
        run's threads)."""
        if self.reason is not None:
            return True
        now = time.perf_counter()
        if now < self._next_poll:
            return False
        self._next_poll = now + CLOCK_POLL_S
        if self.used_s() > self.cpu_s:
            self.reason = "deadline"
        return self.reason is not None


def serve(conn: Connection, warm: bool = True) -> None:
    """The worker's loop: warm up (`warm`), say ready, then answer jobs until the pipe
    closes."""
    tune_allocator()
    # a makemore run makes and frees ~50k small objects (reference counting frees them);
    # at Python's default threshold (700) the cycle collector ran ~3 times a run, each over
    # every young object. Between jobs, release_memory collects the young generations
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
    if warm:
        warm_up()
    baseline_vm, baseline_rss = _memory()
    try:
        conn.send(("ready", os.getpid()))
    except OSError:  # the server went away while this worker started (its port was taken)
        return
    trim_when_idle = False
    while True:
        try:
            if trim_when_idle and not conn.poll(IDLE_TRIM_S):
                release_memory()
                trim_when_idle = False
                continue
            message, handles = receive_with_handles(conn)
        except (EOFError, OSError):
            return
        kind, *args = message
        keep = _JOBS[kind](conn, baseline_vm, handles, *args)
        _limit_memory(None)
        gc.collect(YOUNG_GENERATIONS)  # tensors a young reference cycle still holds
        # A small job's free pages stay for the next job until the worker has been idle a
        # while: handed back after every job, they were faulted in again by the next one
        # (1-2 ms of a makemore round trip). A big job's go back at once.
        if _memory()[1] - baseline_rss > WORKER_TRIM_MIN_BYTES:
            release_memory()
        else:
            trim_when_idle = True
        if not keep or _memory()[1] - baseline_rss > RECYCLE_GROWTH_BYTES:
            return  # the pool sees the pipe close and starts another


def _program(conn: Connection, baseline_vm: int, handles: list[int], body: bytes,
             settings: Settings, go_under_s: float | None = None,
             beside: bool = False) -> bool:  # fmt: skip
    """Admit (decode, validate, dry-run), say what the run will take, and run once the server
    says go (with the threads of the run slot it took). One CPU deadline covers both.
    `go_under_s`: a quiet server's leave to start at once, on one thread, a run estimated at
    most this long (said in the "admitted" message; its rerun comes from beside when
    `beside` and the plan reruns in float64)."""
    # the pipe a lent worker writes this run's float64 rerun into, sent with the job
    rerun_pipe = _pipe_end(handles, beside, writable=False)
    try:
        return _run_program(conn, baseline_vm, body, settings, go_under_s, rerun_pipe)
    finally:
        if rerun_pipe is not None:
            rerun_pipe.close()  # a helper still writing sees it closed, and stops


def _run_program(conn: Connection, baseline_vm: int, body: bytes, settings: Settings,
                 go_under_s: float | None, rerun_pipe: Connection | None) -> bool:  # fmt: skip
    _limit_memory(baseline_vm + hard_memory_bytes(settings))
    deadline = ProcessDeadline(settings.run_deadline_s)
    admitted: jobs.Admitted | None = None
    started = False
    beside = rerun_pipe is not None

    def admit() -> tuple[float, int, bool, bool, bool]:
        nonlocal admitted, started, beside
        admitted = jobs.admit(body, settings, deadline)
        started = go_under_s is not None and admitted.seconds <= go_under_s
        beside = started and beside and admitted.plan.rerun
        return admitted.seconds, admitted.bytes, admitted.plan.rerun, started, beside

    if not _answer(conn, deadline, admit, tag="admitted"):
        return False
    if rerun_pipe is not None and not beside:  # never read: a helper writing sees it closed
        rerun_pipe.close()
    if admitted is None:  # refused or stopped: the worker is ready for another job
        return True
    if started:
        threads = 1  # a small run's
    else:
        go = conn.recv()
        if go[0] != "go":
            return True
        threads = go[1]  # (a run told to wait takes no rerun from beside)
    torch.set_num_threads(threads)

    rerun_beside = (lambda: rerun_from(rerun_pipe)) if beside else None
    return _answer(conn, deadline, lambda: jobs.run(admitted, deadline, rerun_beside))


def rerun_from(pipe: Connection) -> Any:
    """The lent worker's rerun, read from its pipe; None when it wrote none (it closed its
    end: not needed, or it could not make it) or ended mid-way: the run then reruns itself."""
    try:
        return jobs.rerun_outcome(pipe.recv_bytes())
    except (EOFError, OSError):
        return None


def _rerun(conn: Connection, baseline_vm: int, handles: list[int], body: bytes,
           settings: Settings, max_seconds: float) -> bool:  # fmt: skip
    """A program's float64 rerun for the worker running it (admitted again here: the same
    body, the same plan), written into the pipe sent with the job (read by that
    worker in place of its own rerun; app/programs/outcome.py `rerun_payload`); answers
    whether it wrote one. None is written at once for a program whose plan reruns no float64
    or whose run is estimated over `max_seconds` (not a small run: it reruns itself)."""
    pipe = _pipe_end(handles, True, readable=False)  # to the run's worker
    if pipe is None:  # (none came with the job: nothing to write into)
        conn.send(("reran", False))
        return True
    with pipe:
        _limit_memory(baseline_vm + hard_memory_bytes(settings))
        deadline = ProcessDeadline(settings.run_deadline_s)
        torch.set_num_threads(1)  # a small run's, on the spare core

        def rerun() -> bool:
            payload = jobs.rerun(body, settings, deadline, max_seconds)
            if payload is None:
                return False
            try:
                pipe.send_bytes(payload)
            except OSError:  # the run no longer reads (it failed, or it is over)
                return False
            return True

        return _answer(conn, deadline, rerun, tag="reran")


def _train(conn: Connection, baseline_vm: int, handles: list[int], body: bytes,
           settings: Settings) -> bool:  # fmt: skip
    _pipe_end(handles, False)  # (a training is sent none)
    os.nice(TRAINING_NICENESS)
    _limit_memory(baseline_vm + hard_memory_bytes(settings))
    deadline = ProcessDeadline(settings.run_deadline_s)  # the dry runs' deadline
    setup = None

    def prepare() -> None:
        nonlocal setup
        setup = jobs.prepare_training(body, settings, deadline)

    if not _answer(conn, deadline, prepare, reply=False) or setup is None:
        return False
    conn.send(("prepared",))
    if conn.recv()[0] != "go":
        return False
    stop = False

    def should_stop() -> bool:
        nonlocal stop
        if not stop and conn.poll(0):
            stop = conn.recv()[0] == "stop"
        return stop

    try:
        for kind, payload in jobs.training_events(setup, should_stop, settings.train_time_limit_s):
            conn.send(("event", kind, payload))
    except MemoryError:
        conn.send(("event", "error", {"detail": _memory_detail(settings)}))
    conn.send(("end",))
    return False  # a training's worker ends with it: its memory goes back to the system


def _pipe_end(handles: list[int], wanted: bool, **mode: bool) -> Connection | None:
    """The pipe's end that came with a job, as a Connection (`mode`: readable=False or
    writable=False), when the job `wanted` one; any other descriptor is closed."""
    end = Connection(handles[0], **mode) if wanted and handles else None
    for extra in handles[1 if end is not None else 0 :]:
        os.close(extra)
    return end


def _answer(
    conn: Connection, deadline: Any, work: Any, reply: bool = True, tag: str = "ok"
) -> bool:
    """Run `work` and send its outcome; whether the worker may serve another job."""
    try:
        value = work()
    except Refused as refused:
        conn.send(("refused", refused.errors()))
    except RunCancelled:
        conn.send(("stopped", deadline.reason or "deadline", deadline.used_s()))
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, MemoryError) or is_allocation_failure(e):  # the hard limit's
            conn.send(("memory", _allocation_detail(e)))
        else:  # our bug: the server logs it and answers 500
            conn.send(("error", _described(e)))
        return False
    except Exception as e:  # our bug: the server logs it and answers 500
        conn.send(("error", _described(e)))
        return False
    else:
        if reply:
            conn.send((tag, *value) if isinstance(value, tuple) else (tag, value))
    return True


def _allocation_detail(e: BaseException) -> str:
    """torch's allocation failure, in the learner's terms (its text names C++ files)."""
    asked = re.search(r"allocate (\d+) bytes", str(e))
    if asked is None:
        return "an allocation failed"
    return f"an allocation of {human_bytes(int(asked.group(1)))} failed"


def _described(e: BaseException) -> str:
    return "".join(traceback.format_exception(e))[-4000:]


def _memory_detail(settings: Settings) -> str:
    return (f"the training needed more memory than its worker may hold "
            f"({hard_memory_bytes(settings)} bytes past its start)")  # fmt: skip


def _limit_memory(limit: int | None) -> None:
    """The soft address-space limit (None: none); the hard one stays open, so that the next
    job can set its own."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = resource.RLIM_INFINITY if limit is None else limit
    if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft > hard):
        soft = hard
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _memory() -> tuple[int, int]:
    """(address space, resident set) of this process, in bytes."""
    with open("/proc/self/statm") as f:
        size, resident = (int(v) for v in f.read().split()[:2])
    page = os.sysconf("SC_PAGE_SIZE")
    return size * page, resident * page


# a small program through every stage a request takes (decode, dry run, run, check, views):
# torch's and the interpreter's first-call costs, for a fraction of the article's work
WARM_UP_PROGRAM = {
    "inputs": {"x": {"shape": [8, 5]}, "w": {"shape": [5, 3]}, "y": {"shape": [8, 3]}},
    "forward": "h = x @ w\na = torch.relu(h)\nloss = ((a - y) ** 2).mean()",
    "backward": "da = 2 * (a - y) / a.numel()\ndh = (h > 0).float() * da\ndw = x.T @ dh\n"
    "dx = dh @ w.T",
}


def warm_up() -> None:
    """Torch's and the interpreter's first-call costs, paid before the first job."""
    import orjson

    body = orjson.dumps(WARM_UP_PROGRAM)
    deadline = ProcessDeadline(60.0)
    try:
        jobs.run(jobs.admit(body, Settings.model_construct(), deadline), deadline)
    except Exception:  # a warm-up that fails leaves the first job to pay the costs
        pass


_JOBS = {"program": _program, "rerun": _rerun, "train": _train}
