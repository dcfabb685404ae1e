"""The web edge of the sandbox (app/sandbox): a program's request handed to a worker process
as bytes, its answer handed back as bytes. The event loop never decodes or validates a program
body; a worker that overruns is killed, and the server keeps answering."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import Request, Response

from app.cost.budget import human_bytes
from app.refusal import Refused
from app.sandbox.pool import Sandbox, Worker, WorkerLate, WorkerLost, rerun_pipe, wall_limit_s
from app.sandbox.worker import hard_memory_bytes
from app.server.lanes import SMALL_RUN_S, RunLimiter, Stopped
from app.settings import Settings

log = logging.getLogger("broadprop")

PROGRAM_ADVICE = "write it with fewer or smaller inputs, or fewer loop steps"


async def run_program(http: Request) -> Response:
    """POST /api/program: the body, decoded, validated, dry-run, run and answered in a worker
    (one of the sandbox's; queued for up to the queue wait, else 503)."""
    settings: Settings = http.app.state.settings
    limiter: RunLimiter = http.app.state.limiter
    sandbox: Sandbox = http.app.state.sandbox
    body = await http.body()
    async with limiter.program_slot():
        worker = sandbox.take_idle() or await anyio.to_thread.run_sync(sandbox.take)
        call = _Call(http, worker, settings)
        waits_for_go = False  # admitted, and not yet told to go (or to stop)
        running = False  # told to go, or started by itself
        beside: _Beside | None = None
        try:
            # a quiet server (no run in flight) lets a small program start as soon as it is
            # admitted, without a round trip for its run slot (taken meanwhile, for the count)
            quiet = not limiter.in_flight
            # a small program's spare core, as a small run's (app/ops/spare.py): on a quiet
            # server, an idle worker makes its float64 rerun from the start, admitting the
            # body itself (it answers None at once where the run reruns no float64 or is not
            # small: the same plan decides alike)
            if quiet and limiter.torch_threads > 1:
                beside = _Beside.lend(http, sandbox, settings)
            job = ("program", body, settings, SMALL_RUN_S if quiet else None, beside is not None)
            if beside is None:
                worker.send(job)
            else:
                beside.connect(worker, job)
            try:
                # ("admitted", seconds, bytes, rerun, started, with the rerun from beside)
                _, seconds, _, rerun, started, with_rerun = await call.reply()
            except Exception:
                if beside is not None:  # its own refusal, read before it goes back
                    await beside.done(call)
                raise
            waits_for_go = not started
            running = started  # (a worker running when an error comes is not given back)
            if beside is not None and not with_rerun:  # it says None: back before any wait
                await beside.done(call)
            # the run itself holds a run slot like any other run, in the lane its work says
            async with limiter.slot(seconds):
                if not started:  # (not small, or not a quiet server: no rerun beside)
                    small = seconds <= SMALL_RUN_S
                    worker.send(("go", 1 if small else limiter.torch_threads))
                    waits_for_go, running = False, True
                if with_rerun:
                    waited_from = time.monotonic()
                    sent = await beside.done(call)
                    sandbox.reran += sent  # (read after the await: runs wait side by side)
                    call.left_s -= time.monotonic() - waited_from
                answer = await call.reply()
        except BaseException:
            if beside is not None:
                beside.settle()
            if call.clean and waits_for_go:  # (503, or cancelled, before its go)
                call.clean = _told_to_stop(worker)
            elif call.replies == 0 or (running and call.replies < 2):
                # mid-job: cancelled before its admission was read (that reply may have been
                # read and lost), or running when its slot was refused or it was cancelled
                call.clean = False
            (sandbox.give if call.clean else sandbox.discard)(worker)
            raise
        sandbox.give(worker)
    return Response(answer[1], media_type="application/json")


def _told_to_stop(worker: Worker) -> bool:
    """An admitted worker that will not run: told so (it then waits for its next job), or
    False when it cannot hear it."""
    try:
        worker.send(("stop",))
        return True
    except WorkerLost:
        return False


class _Beside:
    """A worker lent for a program's float64 rerun, made beside the run from the start. Its
    payload goes straight to the run's worker, through a pipe of their own
    (app/sandbox/pool.py `rerun_pipe`), never through the server. It is given back only once
    it has answered (`done`), else ended (`settle`): its end of the pipe then closes, and the
    run, reading no payload, reruns itself."""

    def __init__(self, http: Request, sandbox: Sandbox, worker: Worker, settings: Settings,
                 pipe: tuple[int, int]) -> None:  # fmt: skip
        self.sandbox, self.worker = sandbox, worker
        self.pipe = pipe  # (read end, write end): given away, and closed here, by `connect`
        self.call = _Call(http, worker, settings)
        self.sent_at = time.monotonic()  # its wall limit counts from its job, not its wait
        self.settled = False

    @classmethod
    def lend(cls, http: Request, sandbox: Sandbox, settings: Settings) -> _Beside | None:
        """A lent worker and its pipe, not yet told its job (`connect`); None when no worker
        is idle, or no pipe can be made (out of descriptors): the run then reruns itself."""
        try:
            pipe = rerun_pipe()
        except OSError:
            return None
        worker = sandbox.lend()
        if worker is None:
            os.close(pipe[0])
            os.close(pipe[1])
            return None
        return cls(http, sandbox, worker, settings, pipe)

    def connect(self, run: Worker, job: tuple) -> None:
        """Tell the run's worker its `job`, with the pipe's read end (WorkerLost: that worker
        is lost; this one, told nothing, goes back), then this worker its rerun, with the
        write end (one that cannot hear it is settled at once); each in one write. The run
        goes first: it is the longer path (its own pass, its maps, then the check once the
        rerun is read), and each message wakes a worker that may take the server's core for
        a while; sent second, the rerun still comes before the run reads it (makemore: ~1 ms
        early). The server keeps neither end."""
        read_end, write_end = self.pipe
        try:
            try:
                run.send_with_handle(job, read_end)
            except WorkerLost:  # this worker was told nothing: it goes back as it was
                self.settled = True
                self.sandbox.give(self.worker)
                raise
            self.sent_at = time.monotonic()
            try:
                rerun = ("rerun", job[1], self.call.settings, SMALL_RUN_S)
                self.worker.send_with_handle(rerun, write_end)
            except WorkerLost:
                self.settle()
        finally:
            os.close(read_end)
            os.close(write_end)

    async def done(self, run: _Call) -> bool:
        """Wait for its answer: True when it wrote the rerun into the pipe, False when it
        wrote none (not needed, or it could not make it: the run then reruns itself). The
        worker goes back. The client leaving ends the run's worker too."""
        if self.settled:
            return False
        sent = False
        # the helper's wall limit from when it was told its job, and never past the run's
        since_sent = time.monotonic() - self.sent_at
        self.call.left_s = max(min(self.call.left_s - since_sent, run.left_s), 0.01)
        try:
            _, sent = await self.call.reply(("reran",))  # ("reran", whether it wrote one)
        except Stopped as stopped:
            if stopped.reason == "disconnect":
                run.clean = False
                raise
        except (Refused, RuntimeError, WorkerLost):
            pass
        finally:
            self.settle()
        return bool(sent)

    def settle(self) -> None:
        """Back to the pool once it has answered; ended if it never did (mid-job)."""
        if self.settled:
            return
        self.settled = True
        clean = self.call.clean and self.call.replies > 0 and self.worker.alive
        (self.sandbox.give if clean else self.sandbox.discard)(self.worker)


class _Call:
    """One job's replies from a worker, under the job's wall-clock limit (the waits for a run
    slot excluded), and watching for the client to leave."""

    def __init__(self, http: Request, worker: Worker, settings: Settings) -> None:
        self.http, self.worker, self.settings = http, worker, settings
        self.left_s = wall_limit_s(settings.run_deadline_s)
        self.clean = True  # the worker may serve again (it answered, or it refused)
        self.replies = 0  # messages received

    async def reply(self, kinds: tuple[str, ...] = ("admitted", "ok", "prepared")) -> tuple:
        """The worker's next message, one of `kinds`; anything else raised as the edge
        answers it (Refused: 422; Stopped: 422 or 503; a memory failure: 422)."""
        started = time.monotonic()
        outcome: dict[str, Any] = {}

        async def wait() -> None:
            try:
                outcome["reply"] = await self.worker.receive_on_loop(max(self.left_s, 0.01))
            except (WorkerLate, WorkerLost) as e:
                outcome["error"] = e
            group.cancel_scope.cancel()

        async def watch() -> None:
            while True:
                if (await self.http.receive())["type"] == "http.disconnect":
                    outcome["gone"] = True
                    group.cancel_scope.cancel()  # (the read stops before the pipe closes)
                    return

        async with anyio.create_task_group() as group:
            group.start_soon(wait)
            group.start_soon(watch)
        self.left_s -= time.monotonic() - started
        if outcome.get("gone"):
            self.clean = False
            await anyio.to_thread.run_sync(self.worker.kill)  # (its reaping off the loop)
            raise Stopped("disconnect", self.settings.run_deadline_s)
        if "error" in outcome:
            self.clean = False
            raise self.lost(outcome["error"])
        reply = outcome["reply"]
        self.replies += 1
        kind = reply[0]
        if kind in kinds:
            return reply
        if kind == "refused":
            raise Refused(reply[1])
        if kind == "stopped":
            raise Stopped(reply[1], self.settings.run_deadline_s, PROGRAM_ADVICE)
        self.clean = False
        if kind == "memory":
            raise over_memory(self.settings, reply[1])
        log.error("a sandbox worker failed: %s", reply[1])
        raise RuntimeError("the program's worker failed")

    def lost(self, error: Exception) -> Exception:
        deadline = self.settings.run_deadline_s
        if isinstance(error, WorkerLate):
            # its own CPU time tells a program too long from a machine too busy to run it
            reason = "deadline" if error.cpu_s >= 0.9 * deadline else "busy"
            return Stopped(reason, deadline, PROGRAM_ADVICE)
        return over_memory(self.settings, "its worker process ended without an answer")


def over_memory(settings: Settings, detail: str) -> Refused:
    """A worker past its hard memory limit (or ended by the system): a 422 naming the limit.
    The estimate missed what the run took; the server was never at risk."""
    limit = hard_memory_bytes(settings)
    return Refused([{
        "type": "memory_limit",
        "loc": ("body",),
        "msg": f"this program went past the hard memory limit of its worker process, "
               f"{human_bytes(limit)} (the memory budget, BROADPROP_MEMORY_BUDGET_BYTES, plus "
               f"room for torch itself; BROADPROP_WORKER_MEMORY_BYTES), and was stopped there "
               f"({detail}); make its inputs or intermediates smaller",
        "input": None,
        "ctx": {"limit_bytes": limit, "budget_bytes": settings.memory_budget_bytes},
    }])  # fmt: skip


class Training:
    """A program training's own worker, prepared (its 422s already given): `events()` streams
    its events until `done`, and `close()` ends the worker (its memory goes back)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def events(self) -> AsyncIterator[tuple[str, dict]]:
        self.worker.send(("go",))
        try:
            while True:
                message = await anyio.to_thread.run_sync(self.worker.receive, None,
                                                          abandon_on_cancel=True)  # fmt: skip
                if message[0] == "end":
                    return
                if message[0] == "event":
                    yield message[1], message[2]
        except WorkerLost:
            yield "error", {"detail": "training failed: its worker ended (over its memory "
                            "limit, or the server is stopping)"}  # fmt: skip

    def close(self) -> None:
        self.worker.kill()


async def prepared_training(http: Request) -> AsyncIterator[Training]:
    """A dependency: the training's place (503 beyond the server's trainings at once), a
    worker of its own, and every dry run the training needs (422 before the stream)."""
    settings: Settings = http.app.state.settings
    limiter: RunLimiter = http.app.state.limiter
    sandbox: Sandbox = http.app.state.sandbox
    body = await http.body()
    async with limiter.training():
        worker = await anyio.to_thread.run_sync(sandbox.dedicated)
        training = Training(worker)
        try:
            worker.send(("train", body, settings))
            await _Call(http, worker, settings).reply()  # ("prepared",) or raised
            yield training
        finally:
            training.close()
