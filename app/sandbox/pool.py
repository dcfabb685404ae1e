"""The sandbox's workers as the server sees them: a few kept warm for program runs, and one of
its own for each training. Calls that may block (a worker's start, a wait for one, a
training's events, a kill's reaping) the web edge runs off its event loop; a program's replies
are read on the loop as they come (`receive_on_loop`), and `take_idle`, `lend`, `give` and a
job's sends do not wait (a send's message and a pipe's end fit in the socket's buffer)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import spawn
from typing import Any

import anyio

from app.sandbox import messages

WORKER_START_S = 60.0  # a worker's fork and warm-up (a few hundred ms on a quiet machine)


class WorkerLost(Exception):
    """The worker ended without answering (killed, or it exited after a memory failure)."""


class WorkerLate(Exception):
    """The worker did not answer within the wall-clock limit; it has been killed. `cpu_s`: the
    CPU time it had used (its own work), which tells a deadline from a busy machine."""

    def __init__(self, cpu_s: float) -> None:
        super().__init__(f"no answer; {cpu_s:.2f} s of CPU used")
        self.cpu_s = cpu_s


_forkserver_lock = threading.Lock()


def _context() -> Any:
    """Forkserver: workers fork from a process that imported torch and the interpreter but
    never ran a parallel op (a fork after OpenMP has started its threads may hang)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["app.sandbox.zygote"])
    return context


def start_forkserver() -> None:
    """Start the forkserver now, without waiting for it: its preload (torch, the interpreter
    and their first-call costs, ~1.5 s of CPU) then runs beside the serving process's own
    start-up, rather than after it, when the first workers are made (`python -m app`: the
    first program answered ~2.2 s after /healthz came up, as its forkserver started then)."""
    from multiprocessing import forkserver

    try:
        _context()  # (its preload set)
        with _without_main():
            forkserver.ensure_running()
    except (OSError, ValueError):  # no forkserver here: programs then fail as they would have
        pass


@contextmanager
def _without_main() -> Iterator[None]:
    """Start the forkserver and its workers without the serving process's __main__:
    multiprocessing would import it in each (a script that made an app at its top level, or a
    notebook's kernel, would run again there). Workers need only app.sandbox.worker."""
    original = spawn.get_preparation_data

    def without_main(name: str) -> dict:
        data = original(name)
        data.pop("main_path", None)
        data.pop("init_main_from_name", None)
        data.pop("init_main_from_path", None)
        return data

    with _forkserver_lock:
        spawn.get_preparation_data = without_main
        try:
            yield
        finally:
            spawn.get_preparation_data = original


class Worker:
    """One worker process and its end of the pipe."""

    def __init__(self, warm: bool = True) -> None:
        from app.sandbox import worker  # the forkserver imports it; here only its name

        context = _context()
        self.conn, child = context.Pipe(duplex=True)
        self.process = context.Process(target=worker.serve, args=(child, warm), daemon=True,
                                       name="broadprop-sandbox")  # fmt: skip
        with _without_main():
            self.process.start()
        child.close()
        self.ready = False
        # `kill` may come from two threads at once (a training's client gone, seen by the
        # event loop, while the thread reading its events sees the pipe close): its end is
        # closed once, never a second time after its number went to a new pipe or socket
        self._closing = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def wait_ready(self, timeout: float = WORKER_START_S) -> Worker:
        if not self.ready:
            reply = self.receive(timeout)
            if reply[0] != "ready":
                raise WorkerLost(f"unexpected first message {reply[0]!r}")
            self.ready = True
        return self

    def send(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except (OSError, ValueError) as e:
            raise WorkerLost(str(e)) from None

    def send_with_handle(self, message: tuple, fd: int) -> None:
        """`message` and a duplicate of descriptor `fd` (this process's) for the worker, in
        one write (app/sandbox/messages.py): the worker reads both with its next message."""
        try:
            messages.send_with_handle(self.conn, message, fd)
        except (OSError, ValueError) as e:
            raise WorkerLost(str(e)) from None

    def receive(self, timeout: float | None) -> tuple:
        """The worker's next message; WorkerLate (and the worker killed) after `timeout`."""
        try:
            if not self.conn.poll(timeout):
                cpu = self.cpu_s()
                self.kill()
                raise WorkerLate(cpu)
            return self.conn.recv()
        except (EOFError, OSError, ValueError):
            self.kill()
            raise WorkerLost(f"exit code {self.process.exitcode}") from None

    async def receive_on_loop(self, timeout: float | None) -> tuple:
        """`receive` on the event loop, with no thread (app/sandbox/messages.py): a
        program's three replies each took two thread wake-ups that way. A wait cut short by
        a cancellation may leave half a reply unread: the edge never reuses a worker cut
        off mid-reply; one past `timeout` is killed here (its reaping off the loop: a worker
        holding a GB takes ~0.1 s to go). Nothing may kill a worker while its reply is
        being read here: the loop would not hear its pipe close."""
        try:
            with anyio.move_on_after(timeout):
                return await messages.receive_on_loop(self.conn)
        except (EOFError, OSError, ValueError, anyio.ClosedResourceError):
            await anyio.to_thread.run_sync(self.kill)
            raise WorkerLost(f"exit code {self.process.exitcode}") from None
        cpu = self.cpu_s()
        await anyio.to_thread.run_sync(self.kill)
        raise WorkerLate(cpu)

    def cpu_s(self) -> float:
        """CPU time the process has used (user + system), from /proc; 0 if it is gone."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    def rss_bytes(self) -> int:
        try:
            with open(f"/proc/{self.pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            return 0

    @property
    def alive(self) -> bool:
        return self.process.is_alive() and not self.conn.closed

    def kill(self, reap: bool = True) -> None:
        """SIGKILL, and its end of the pipe closed; then (`reap`) wait for the process to be
        gone (a worker holding a GB takes ~0.1 s: never on the event loop)."""
        if self.process.pid is not None and self.process.exitcode is None:
            try:
                os.kill(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        with self._closing:
            if not self.conn.closed:
                self.conn.close()
        if reap:
            self.process.join(5)


RERUN_PIPE_BYTES = 1 << 20  # a small program's float64 rerun (makemore's: 369 KB) in one write


def rerun_pipe() -> tuple[int, int]:
    """(read end, write end) of a pipe from a lent worker to a run's worker, for the run's
    float64 rerun: the payload goes from one worker to the other, not through the server.
    Its capacity is raised where Linux allows, so that the lent worker's write ends at once
    and it is free before the run reads (a bigger payload waits for the reader)."""
    read_end, write_end = os.pipe()  # (OSError when out of descriptors: no helper then)
    try:
        import fcntl

        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, RERUN_PIPE_BYTES)
    except (ImportError, AttributeError, OSError):  # another OS, or a lower system limit
        pass
    return read_end, write_end


# how long a run waits for a lent worker's return rather than starting one (a lend lasts a
# small program's admission and rerun: tens of ms)
LENT_WAIT_S = 2.0


class Sandbox:
    """`size` workers kept warm for program runs (`take`, `give`), and a fresh one for each
    training (`dedicated`). A worker given back dead or failed is replaced in the background,
    so the next run finds one warm. An idle worker may also be lent to a run for a piece of
    its work (`lend`: a small program's float64 rerun, beside its own run), for tens of ms."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._idle: list[Worker] = []
        self._busy: set[Worker] = set()
        self._lent: set[Worker] = set()
        self._starting = 0
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)  # a lent worker is back
        self._waiting = 0  # runs waiting in `take` for a lent worker (never lent again first)
        self._start_lock = threading.Lock()  # held while the first workers warm up
        self._started = False
        self.replaced = 0  # workers replaced after a kill or a failure (for tests and logs)
        self.lent = 0  # workers lent for a piece of a run (for tests and logs)
        self.reran = 0  # of them, reruns written into the run's pipe (the run reads them)

    def start(self) -> None:
        """Start the pool's workers (once; blocking until they are warm, for every caller)."""
        with self._start_lock:
            if self._started:
                return
            workers = [Worker() for _ in range(self.size)]
            for w in workers:
                w.wait_ready()
            with self._lock:
                self._idle.extend(workers)
            self._started = True

    def start_soon(self) -> None:
        """`start` in the background (the server answers meanwhile; a program waits)."""
        threading.Thread(target=self.start, name="broadprop-sandbox-start", daemon=True).start()

    def take_idle(self) -> Worker | None:
        """`take` without blocking: the idle warm worker used last, or None when that would
        wait (the pool still starting, none idle, or a run already waiting for one). The
        edge calls it on the event loop, so that the common case needs no thread."""
        if not self._started:
            return None
        with self._lock:
            if self._waiting or not self._idle or not self._idle[-1].alive:
                return None  # (a dead one is ended, and replaced, by `take`, off the loop)
            worker = self._idle.pop()
            self._busy.add(worker)
            return worker

    def take(self) -> Worker:
        """A warm worker (the one used last, whose caches are warmest), or a new one."""
        self.start()
        with self._lock:
            # a lent worker is back within tens of ms: waited for, not replaced by a fresh
            # one (a fork and a warm-up, hundreds of ms)
            self._waiting += 1
            try:
                self._returned.wait_for(lambda: self._idle or not self._lent, LENT_WAIT_S)
            finally:
                self._waiting -= 1
            worker = self._pop_idle()
            if worker is not None:
                self._busy.add(worker)
                return worker
        worker = Worker().wait_ready()
        with self._lock:
            self._busy.add(worker)
        return worker

    def lend(self) -> Worker | None:
        """An idle warm worker for a piece of a run, or None when none is idle now (never a
        new one: the piece is then done by the run's own worker). Given back with `give`."""
        with self._lock:
            if self._waiting:  # a run waiting for a worker goes first
                return None
            worker = self._pop_idle()
            if worker is not None:
                self._lent.add(worker)
                self.lent += 1
            return worker

    def _pop_idle(self) -> Worker | None:
        """The idle worker used last that is still alive (the lock held); dead ones ended."""
        while self._idle:
            worker = self._idle.pop()
            if worker.alive:
                return worker
            worker.kill()
        return None

    def give(self, worker: Worker) -> None:
        """A worker back after a job; a dead one is replaced."""
        with self._lock:
            self._busy.discard(worker)
            self._lent.discard(worker)
            if worker.alive and len(self._idle) < self.size:
                self._idle.append(worker)
                self._returned.notify_all()
                return
            self._returned.notify_all()
        if worker.alive:
            worker.kill()
            return
        self.discard(worker)

    def discard(self, worker: Worker) -> None:
        """Kill `worker` and start its replacement in the background (its reaping there too:
        the edge discards on its event loop)."""
        with self._lock:
            self._busy.discard(worker)
            self._lent.discard(worker)
            self._returned.notify_all()
        worker.kill(reap=False)
        self.replaced += 1
        threading.Thread(target=self._replace, args=(worker,), name="broadprop-sandbox-start",
                         daemon=True).start()  # fmt: skip

    def _replace(self, gone: Worker | None = None) -> None:
        if gone is not None:
            gone.kill()  # (reaped)
        with self._lock:
            if len(self._idle) + self._starting >= self.size:
                return
            self._starting += 1
        try:
            fresh = Worker().wait_ready()
        except (WorkerLost, WorkerLate):
            return
        finally:
            with self._lock:
                self._starting -= 1
        self.give(fresh)

    def dedicated(self) -> Worker:
        """A fresh worker of its own (a training's), ended by its caller. Not warmed up: a
        training pays torch's first-call costs once, in its first step."""
        return Worker(warm=False).wait_ready()

    def idle_pids(self) -> list[int]:
        with self._lock:
            return [w.pid for w in self._idle if w.pid is not None]

    def busy_pids(self) -> list[int]:
        """The workers running a program now (a test kills one mid-run)."""
        with self._lock:
            return [w.pid for w in self._busy if w.pid is not None]

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for w in idle:
            w.kill()


_pool: Sandbox | None = None
_pool_lock = threading.Lock()


def sandbox_for(size: int) -> Sandbox:
    """The process's one sandbox, with at least `size` workers (made on first use, shared by
    every app in the process, as the run lanes are; an app's own bound on programs at once
    is its limiter's)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = Sandbox(size)
        _pool.size = max(_pool.size, size)
        return _pool


def wall_limit_s(deadline_s: float) -> float:
    """The wall-clock limit of a job whose CPU deadline is `deadline_s`: 1.4 x it (4.2 s for
    the default 3 s: no request is held past 4.5 s), and at least a second more than it (a
    short deadline still leaves room for a loaded machine's scheduling)."""
    return max(1.4 * deadline_s, deadline_s + 1.0)
