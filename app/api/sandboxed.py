"""The web edge of the sandbox (app/sandbox): a program's request handed to a worker process
as bytes, its answer handed back as bytes. The event loop never decodes or validates a program
body; a worker that overruns is killed, and the server keeps answering."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import Request, Response

from app.cost.budget import human_bytes
from app.refusal import Refused
from app.sandbox.pool import Sandbox, Worker, WorkerLate, WorkerLost, wall_limit_s
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
        worker = await anyio.to_thread.run_sync(sandbox.take)
        call = _Call(http, worker, settings)
        waits_for_go = False  # admitted, and not yet told to go (or to stop)
        try:
            worker.send(("program", body, settings))
            _, seconds, _, rerun = await call.reply()  # ("admitted", seconds, bytes, rerun)
            waits_for_go = True
            # the run itself holds a run slot like any other run, in the lane its work says
            async with limiter.slot(seconds):
                small = seconds <= SMALL_RUN_S
                # a small run's spare core (as app/ops/spare.py gives a run's pieces): its
                # float64 rerun in an idle worker, beside the run
                beside = rerun and small and limiter.torch_threads > 1
                helper = sandbox.lend() if beside else None
                if helper is None:
                    worker.send(("go", 1 if small else limiter.torch_threads, False))
                    waits_for_go = False
                else:
                    waits_for_go = False  # (told to go in there, whatever happens)
                    await _rerun_beside(http, call, helper, body, settings, sandbox)
                answer = await call.reply()
        except BaseException:
            if call.clean and waits_for_go:  # (503, or cancelled, before its go)
                call.clean = _told_to_stop(worker)
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


async def _rerun_beside(http: Request, call: _Call, helper: Worker, body: bytes,
                        settings: Settings, sandbox: Sandbox) -> None:  # fmt: skip
    """Start the run in `call`'s worker and its float64 rerun in `helper` at once, then relay
    the rerun to the run's worker: its payload, or None (that worker then reruns itself) when
    the helper could not make it. The run's worker, once told to go, gets exactly one
    ("rerun", ...), or is not given back (`call.clean` False); the helper is given back only
    once it has answered."""
    helper_call = _Call(http, helper, settings, left_s=call.left_s)  # one wall limit for both
    payload = None
    started = time.monotonic()
    try:
        call.worker.send(("go", 1, True))
        helper.send(("rerun", body, settings))
        _, payload = await helper_call.reply(("reran",))  # ("reran", payload or None)
    except Stopped as stopped:
        if stopped.reason == "disconnect":  # the client left: the run's worker is ended too
            call.clean = False
            raise
    except WorkerLost:  # a pipe broke: that worker cannot serve again
        helper_call.clean = False
    except (Refused, RuntimeError):  # the run's worker does it all itself
        pass
    except BaseException:  # cancelled: neither worker is where the protocol expects it
        helper_call.clean = call.clean = False
        raise
    finally:
        if helper_call.replies == 0:  # never answered: mid-job, or never told its job
            helper_call.clean = False
        (sandbox.give if helper_call.clean else sandbox.discard)(helper)
    call.left_s -= time.monotonic() - started
    sandbox.reran += payload is not None
    await _relay(call, payload)


async def _relay(call: _Call, payload: bytes | None) -> None:
    """Send the run's worker its rerun, off the event loop (the payload may be more than the
    pipe holds: the send then lasts until the worker reads it), within its wall limit."""
    started = time.monotonic()
    with anyio.move_on_after(max(call.left_s, 0.01)) as scope:
        try:
            await anyio.to_thread.run_sync(call.worker.send, ("rerun", payload),
                                           abandon_on_cancel=True)  # fmt: skip
        except WorkerLost:  # it ended (its memory limit): call.reply() reads its last words
            pass
    call.left_s -= time.monotonic() - started
    if scope.cancelled_caught:  # it never came to read its rerun: late, as a reply would be
        cpu = call.worker.cpu_s()
        call.worker.kill()
        call.clean = False
        raise call.lost(WorkerLate(cpu))


class _Call:
    """One job's replies from a worker, under the job's wall-clock limit (the waits for a run
    slot excluded), and watching for the client to leave."""

    def __init__(self, http: Request, worker: Worker, settings: Settings,
                 left_s: float | None = None) -> None:  # fmt: skip
        self.http, self.worker, self.settings = http, worker, settings
        self.left_s = wall_limit_s(settings.run_deadline_s) if left_s is None else left_s
        self.clean = True  # the worker may serve again (it answered, or it refused)
        self.replies = 0  # messages received

    async def reply(self, kinds: tuple[str, ...] = ("admitted", "ok", "prepared")) -> tuple:
        """The worker's next message, one of `kinds`; anything else raised as the edge
        answers it (Refused: 422; Stopped: 422 or 503; a memory failure: 422)."""
        started = time.monotonic()
        outcome: dict[str, Any] = {}

        async def wait() -> None:
            try:
                outcome["reply"] = await anyio.to_thread.run_sync(
                    self.worker.receive, max(self.left_s, 0.01)
                )
            except (WorkerLate, WorkerLost) as e:
                outcome["error"] = e
            group.cancel_scope.cancel()

        async def watch() -> None:
            while True:
                if (await self.http.receive())["type"] == "http.disconnect":
                    outcome["gone"] = True
                    self.worker.kill()  # the waiting thread sees the pipe close
                    return

        async with anyio.create_task_group() as group:
            group.start_soon(wait)
            group.start_soon(watch)
        self.left_s -= time.monotonic() - started
        if outcome.get("gone"):
            self.clean = False
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
