"""Memory at rest (issue 34): the RSS of `python -m app` once started, and after its first runs.

    .venv/bin/python benchmarks/memory.py          # or: ./scripts/bench memory   (about 20 s)

Starts the server as a user does (tests/servers.py LiveServer: `python -m app` on a free
loopback port), waits until it is healthy and its program workers are warm, then prints the
serving process's RSS (the target: <= 350 MB; torch alone takes ~240 MB here): at rest, after
the article's run, after makemore's program and once it has been idle for IDLE_TRIM_S. The sandbox's worker
processes are listed apart (forked from one zygote: most of their pages are shared, so their
PSS, not their RSS, is what they add), with the first request's time beside the warm one's:
what start-up does not pay, the first request would.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: tests.* from the repository root
from app.sandbox.allocator import IDLE_TRIM_S  # noqa: E402
from tests.servers import LiveServer  # noqa: E402

TARGET_MB = 350
MB = 1e6


def post(server: LiveServer, path: str, body: dict) -> float:
    request = urllib.request.Request(
        server.url(path), json.dumps(body).encode(), {"content-type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
    return time.perf_counter() - start


def pss(process: psutil.Process) -> int:
    try:
        return process.memory_full_info().pss
    except (psutil.Error, AttributeError):
        return 0


def makemore_body() -> dict:
    from app.programs import presets

    return presets.preset("makemore")["request"]


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    load = os.getloadavg()[0]
    server = LiveServer()
    try:
        serving = psutil.Process(server.proc.pid)
        time.sleep(5.0)  # the workers' warm-up (in the background) is over
        rows = [("at rest, 5 s after start", serving.memory_info().rss)]
        first = post(server, "/api/run", {})
        warm = min(post(server, "/api/run", {}) for _ in range(3))
        rows.append(("after the article's run", serving.memory_info().rss))
        body = makemore_body()
        program_first = post(server, "/api/program", body)
        program_warm = min(post(server, "/api/program", body) for _ in range(3))
        rows.append(("after makemore's program", serving.memory_info().rss))
        time.sleep(IDLE_TRIM_S + 2.0)  # the server gives free pages back once idle
        rows.append((f"{IDLE_TRIM_S + 2:.0f} s later, idle", serving.memory_info().rss))
        workers = serving.children(recursive=True)
        worker_pss = sum(pss(p) for p in workers)
    finally:
        server.stop()
    print(f"Memory of `python -m app` (load average {load:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after, {os.cpu_count()} cores)")  # fmt: skip
    for name, rss in rows:
        print(f"  {name:<28} RSS {rss / MB:6.0f} MB")
    idle = rows[0][1] / MB
    print(f"  idle RSS {idle:.0f} MB (target <= {TARGET_MB} MB: "
          f"{'PASS' if idle <= TARGET_MB else 'MISS'})")  # fmt: skip
    print(f"  its {len(workers)} child processes (sandbox zygote, workers, tracker): "
          f"PSS {worker_pss / MB:.0f} MB in all")  # fmt: skip
    print(f"  first article run {first * 1e3:.0f} ms (warm {warm * 1e3:.0f} ms); first program "
          f"{program_first * 1e3:.0f} ms (warm {program_warm * 1e3:.0f} ms)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
