"""`run_script(argv)`: what `subprocess.run([sys.executable, *argv], capture_output=True,
text=True)` answers, for the tests that run an exported script or a benchmark as a learner
would, without paying Python's start and torch's import (about 1.5 s of CPU) for each.

The script runs in a process of its own, forked from a zygote: an interpreter that has
imported torch and numpy and nothing else (never the app: a script that could not import it
on its own fails here as it would alone), and never ran a torch op (a fork after OpenMP has
started its threads may hang; app/sandbox forks its workers the same way). The child is set
up as `python script.py` sets up a process: the script's folder first on sys.path, then the
environment's PYTHONPATH, then the interpreter's own path; `sys.argv`, the working folder, the
environment, `__name__ == "__main__"`; stdout and stderr to files; the exit status from
SystemExit, or 1 with the traceback."""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

_ZYGOTE = r"""
import json, os, runpy, sys, traceback
import numpy, torch  # what every script imports first: paid once, here

requests = os.fdopen(os.dup(0), "r")
replies = os.fdopen(os.dup(1), "w")
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 0)
os.dup2(null, 1)
base = [p for p in sys.path if p]  # the interpreter's own (started without PYTHONPATH or '')

def run(req):
    code = 1
    try:
        requests.close()
        replies.close()
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        script = req["argv"][0]
        extra = [os.path.abspath(p) for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [os.path.dirname(os.path.abspath(script)), *extra, *base]
        sys.argv = list(req["argv"])
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)

for line in requests:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        run(req)
    replies.write(json.dumps({"pid": pid}) + "\n")
    replies.flush()
    _, status = os.waitpid(pid, 0)
    replies.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
    replies.flush()
"""


class _Zygote:
    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=tempfile.gettempdir(),
        )
        self._pending = b""
        atexit.register(self.close)

    def _line(self, timeout: float | None) -> dict | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the script zygote exited ({self.proc.wait()})")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, argv: list[str], cwd: str, env: dict[str, str], timeout: float | None):
        with tempfile.TemporaryDirectory() as folder:
            out, err = Path(folder, "stdout"), Path(folder, "stderr")
            request = {"argv": argv, "cwd": cwd, "env": env, "stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            pid = self._line(None)["pid"]
            done = self._line(timeout)
            if done is None:
                os.kill(pid, signal.SIGKILL)
                self._line(None)
                raise subprocess.TimeoutExpired(argv, timeout, out.read_text(), err.read_text())
            return done["code"], out.read_text(errors="replace"), err.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_zygote: _Zygote | None = None


def run_script(
    argv: list[str],
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess:
    """`python *argv` (argv[0] the script's path) in `cwd` with `env` (default: this
    process's), as subprocess.run(..., capture_output=True, text=True) answers it."""
    global _zygote
    argv = [str(a) for a in argv]
    cwd = os.path.abspath(cwd or os.getcwd())
    env = dict(os.environ if env is None else env)
    if not hasattr(os, "fork"):  # no fork here: a process of its own, from the start
        return subprocess.run(
            [sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
    if _zygote is None or _zygote.proc.poll() is not None:
        _zygote = _Zygote()
    code, stdout, stderr = _zygote.run(argv, cwd, env, timeout)
    return subprocess.CompletedProcess([sys.executable, *argv], code, stdout, stderr)
