"""Issue 28's probe, replayed against `python -m app` on loopback (not part of the tests):

    .venv/bin/python benchmarks/sandbox.py [--runs 20]

- N1: a stretched view (`expand(100000, 64, 64)`): status, seconds, and the RSS rise of the
  server and of its sandbox workers;
- N3: a short triple loop (193 characters): how long the request is held, alone and four at once;
- N4: the article's run (median of --runs) alone, then while one and four clients post 0.75 MiB
  programs; /healthz meanwhile;
- N5: twelve program trainings at once: how many start (200) and how many get 503;
- the makemore exercise's POST /api/program: first (cold) and warm, the median of --runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import psutil
from classroom import Server  # the script's own folder

ROOT = Path(__file__).resolve().parent.parent
EXPAND = {
    "inputs": {"x": {"shape": [64, 64]}},
    "forward": "y = x.unsqueeze(0).expand(100000, 64, 64)\nloss = y.sum()",
    "backward": "dx = torch.ones_like(x) * 100000",
}
LOOP = {
    "inputs": {"x": {"shape": [8]}},
    "forward": "loss = (x * x).sum()",
    "backward": "s = 0\nfor i in range(60):\n    for j in range(60):\n        for k in range(60):\n"
    "            s = s + x[0] * i\ndx = 2 * x",
}
BIG = {  # about 0.75 MiB of JSON: a value input of 65,536 numbers
    "inputs": {"v": {"value": [round(0.001 * i, 3) for i in range(65_536)]}},
    "forward": "loss = (v * v).sum()",
    "backward": "dv = 2 * v",
}


def tree_rss(server: Server) -> tuple[int, int]:
    """(the serving process's RSS, its children's: forkserver and workers)."""
    proc = psutil.Process(server.proc.pid)
    children = sum(c.memory_info().rss for c in proc.children(recursive=True))
    return proc.memory_info().rss, children


def mib(n: float) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def median_ms(server: Server, path: str, body: dict | None, runs: int) -> float:
    times = [server.request("POST" if body is not None else "GET", path, body)[1]
             for _ in range(runs)]  # fmt: skip
    return statistics.median(times) * 1e3


def flood(server: Server, body: dict, clients: int, stop: threading.Event) -> list[int]:
    statuses: list[int] = []

    def client() -> None:
        while not stop.is_set():
            statuses.append(server.request("POST", "/api/program", body)[0])

    for _ in range(clients):
        threading.Thread(target=client, daemon=True).start()
    return statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    server = Server()
    try:
        time.sleep(3)  # the sandbox's workers warm up
        presets = {p["id"]: p for p in json.loads(_get(server, "/api/programs"))}
        makemore = presets["makemore"]["request"]
        status, first, _ = server.request("POST", "/api/program", makemore)
        warm = median_ms(server, "/api/program", makemore, args.runs)
        print(f"makemore program: first {first * 1e3:.0f} ms ({status}), warm median {warm:.0f} ms")

        before = tree_rss(server)
        status, took, _ = server.request("POST", "/api/program", EXPAND)
        after = tree_rss(server)
        print(f"N1 expand: {status} in {took:.2f} s; server RSS {mib(before[0])} -> "
              f"{mib(after[0])}, workers {mib(before[1])} -> {mib(after[1])}")  # fmt: skip

        status, took, _ = server.request("POST", "/api/program", LOOP)
        print(f"N3 triple loop alone: {status} in {took:.2f} s")
        held: list[tuple[int, float]] = []
        threads = [threading.Thread(target=lambda: held.append(
            server.request("POST", "/api/program", LOOP)[:2])) for _ in range(4)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print("N3 four at once: " + ", ".join(f"{s} in {h:.2f} s" for s, h in held))

        alone = median_ms(server, "/api/run", {}, args.runs)
        print(f"N4 article run alone: median {alone:.0f} ms")
        for clients in (1, 4):
            stop = threading.Event()
            statuses = flood(server, BIG, clients, stop)
            time.sleep(1)
            during = median_ms(server, "/api/run", {}, args.runs)
            health = median_ms(server, "/healthz", None, args.runs)
            stop.set()
            time.sleep(1)
            print(f"N4 with {clients} client(s) posting 0.75 MiB programs: article run median "
                  f"{during:.0f} ms, /healthz {health:.0f} ms ({len(statuses)} programs "
                  f"answered: {sorted(set(statuses))})")  # fmt: skip

        body = {"program": presets["makemore"]["request"], "steps": 20000}
        results: list[int] = []

        def train() -> None:
            results.append(server.request("POST", "/api/program/train", body)[0])

        trainings = [threading.Thread(target=train, daemon=True) for _ in range(12)]
        for t in trainings:
            t.start()
        time.sleep(5)
        print(f"N5 twelve trainings at once: {results.count(503)} got 503 at once; the rest "
              f"are streaming ({len(psutil.Process(server.proc.pid).children(recursive=True))} "
              "sandbox processes)")  # fmt: skip
    finally:
        server.proc.kill()


def _get(server: Server, path: str) -> str:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


if __name__ == "__main__":
    main()
