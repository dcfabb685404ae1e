"""A live `python -m app` (uvicorn behind the connection guard, as served) on a free loopback
port, for the tests that need real sockets: the browser, a stream's hang-up, the guard."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """Started and healthy on construction (RuntimeError with the server's last words if it
    does not come up within `start_s`); `env`: BROADPROP_* settings for it."""

    def __init__(self, start_s: float = 120, **env: str) -> None:
        self.port = free_port()
        # a file, not a pipe: a chatty server must never block on a pipe nobody reads
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app"],
            cwd=ROOT,
            env={
                **os.environ,
                "BROADPROP_HOST": "127.0.0.1",
                "BROADPROP_PORT": str(self.port),
                **env,
            },
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        deadline = time.monotonic() + start_s
        while True:
            try:
                with urllib.request.urlopen(self.url("/healthz"), timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self._log.seek(0)  # read before stop() closes the log
                    last = self._log.read().decode(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"server did not start: {last}") from None
                time.sleep(0.2)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
