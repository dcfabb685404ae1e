"""Bounded load test: a uvicorn on loopback, N simultaneous requests of the article's run.

    .venv/bin/python benchmarks/load.py [--n 96] [--env BROADPROP_QUEUE_WAIT_S=2 ...]

Starts `python -m app` on 127.0.0.1 (a free port), asks for the article's run once
(the sequential answer), then fires N requests at once while /healthz is polled, and a
battery of malformed and oversized requests alongside. Reports status counts, latency
percentiles, the server's peak RSS (psutil, sampled every 10 ms) and whether every 200 is
identical to the sequential answer (timing aside). Exits 1 when a target is missed:
only 200/503 under load, peak RSS <= 1.5 GB, every 200 identical, malformed all 4xx < 3 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx  # the dev extra's HTTP client (an httpx fork with its API)
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: tests.* from the repository root
from tests.servers import LiveServer  # noqa: E402

RSS_TARGET = 1.5e9
MALFORMED_LIMIT_S = 3.0
JSON = {"content-type": "application/json"}
MALFORMED = [
    b'{"batch": -1}',
    b'{"seed": 18446744073709551617}',
    b'{"init_scale": NaN}',
    b'{"init_scale": Infinity}',
    b'{"hidden": [1000000]}',
    b'{"unknown": 1}',
    b"not json",
    b"\xff\xfe",
    b"[" * 20_000 + b"]" * 20_000,
    b'{"batch": 1000000, "hidden": [4096]}',  # over the memory budget (batch)
    b'{"batch": 1, "in_features": 16384, "hidden": [4096, 4096, 4096, 4096]}',  # (widths)
]


class RssSampler(threading.Thread):
    """Peak resident memory of the server (and any children), sampled every 10 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def rss(self) -> int:
        procs = [self.process, *self.process.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, self.rss())
            except psutil.Error:
                return
            time.sleep(0.01)


def without_timing(body: bytes) -> dict:
    answer = json.loads(body)
    answer.pop("timing", None)
    return answer


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3, 1)

    return {
        "p50_ms": pick(0.50),
        "p90_ms": pick(0.90),
        "p99_ms": pick(0.99),
        "max_ms": round(ordered[-1] * 1e3, 1),
        "mean_ms": round(statistics.fmean(ordered) * 1e3, 1),
    }


async def timed(client: httpx.AsyncClient, method: str, url: str, **kw) -> tuple[int, float, bytes]:
    start = time.perf_counter()
    try:
        r = await client.request(method, url, **kw)
        return r.status_code, time.perf_counter() - start, r.content
    except httpx.HTTPError as e:  # a refused or dropped connection counts as an error
        return -1, time.perf_counter() - start, repr(e).encode()


async def poll_health(client: httpx.AsyncClient, base: str, done: asyncio.Event) -> list:
    results = []
    while not done.is_set():
        results.append(await timed(client, "GET", f"{base}/healthz"))
        await asyncio.sleep(0.05)
    return results


def chunked_oversize(port: int, total: int = 64 << 20) -> dict:
    """A chunked body far over the limit, on a raw socket: the server answers 413 and closes
    long before the client could send it all (a client like httpx sees only the reset)."""
    chunk = b" " * (64 << 10)
    frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    head = (
        f"POST /api/run HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    sent, reply = 0, b""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        s.setblocking(False)
        while sent < total:
            try:
                reply += s.recv(65536)
                break  # the server answered before the body was done
            except BlockingIOError:
                pass
            try:
                s.sendall(frame)
                sent += len(chunk)
            except (BlockingIOError, ConnectionError):
                break
        s.settimeout(10)
        try:
            while b"\r\n" not in reply:
                more = s.recv(65536)
                if not more:
                    break
                reply += more
        except OSError:
            pass
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else -1
    return {
        "status": status,
        "ms": round((time.perf_counter() - start) * 1e3, 1),
        "bytes_sent": sent,
        "of_bytes": total,
    }


def malformed_report(results: list[tuple[int, float, bytes]]) -> dict:
    """Statuses of the malformed battery and its slowest request (the < 3 s target)."""
    slowest = max(range(len(results)), key=lambda i: results[i][1])
    body = MALFORMED[slowest]
    return {
        "statuses": [s for s, _, _ in results],
        "max_ms": round(results[slowest][1] * 1e3, 1),
        "slowest": {
            "body": body[:60].decode("utf-8", "replace") + ("..." if len(body) > 60 else ""),
            "status": results[slowest][0],
        },
        "over_limit": [
            MALFORMED[i][:60].decode("utf-8", "replace")
            for i, (_, t, _) in enumerate(results)
            if t >= MALFORMED_LIMIT_S
        ],
    }


async def load(base: str, n: int) -> dict:
    limits = httpx.Limits(max_connections=n + 32, max_keepalive_connections=n + 32)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        status, _, reference = await timed(client, "POST", f"{base}/api/run", json={})
        assert status == 200, reference[:300]
        sequential = without_timing(reference)

        done = asyncio.Event()
        health = asyncio.create_task(poll_health(client, base, done))
        start = time.perf_counter()
        runs = [timed(client, "POST", f"{base}/api/run", json={}) for _ in range(n)]
        bad = [timed(client, "POST", f"{base}/api/run", content=b, headers=JSON) for b in MALFORMED]
        results = await asyncio.gather(*runs, *bad)
        wall = time.perf_counter() - start
        done.set()
        health_results = await health

    run_results, bad_results = results[:n], results[n:]
    statuses: dict[str, int] = {}
    for status, _, _ in run_results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    ok = [(t, body) for status, t, body in run_results if status == 200]
    identical = sum(without_timing(body) == sequential for _, body in ok)
    return {
        "n": n,
        "wall_s": round(wall, 2),
        "status_counts": statuses,
        "latency_200": percentiles([t for t, _ in ok]),
        "latency_all": percentiles([t for _, t, _ in run_results]),
        "identical_200s": f"{identical}/{len(ok)}",
        "all_200s_identical": identical == len(ok),
        "healthz_during_load": {
            "requests": len(health_results),
            "statuses": sorted({s for s, _, _ in health_results}),
            **percentiles([t for _, t, _ in health_results]),
        },
        "malformed": malformed_report(bad_results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=96, help="simultaneous requests (default 96)")
    parser.add_argument(
        "--env", action="append", default=[], help="BROADPROP_X=value for the server"
    )
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)

    server = LiveServer(**env)  # python -m app, as served: uvicorn behind the connection guard
    base, port = server.base, server.port
    try:
        sampler = RssSampler(server.proc.pid)
        idle_rss = sampler.rss()
        sampler.start()
        report = asyncio.run(load(base, args.n))
        report["chunked_oversize"] = chunked_oversize(port)
        sampler.stop.set()
        sampler.join()
        report["server_rss_idle_mb"] = round(idle_rss / 1e6, 1)
        report["server_rss_peak_mb"] = round(sampler.peak / 1e6, 1)
        report["server_alive_after"] = server.proc.poll() is None
        report["env"] = env
        report["cpu_count"] = os.cpu_count()
    finally:
        server.stop()

    checks = {
        "only 200/503 under load": set(report["status_counts"]) <= {"200", "503"},
        "at least one 200": "200" in report["status_counts"],
        "every 200 identical": report["all_200s_identical"],
        "peak RSS <= 1.5 GB": report["server_rss_peak_mb"] * 1e6 <= RSS_TARGET,
        "healthz always 200": report["healthz_during_load"]["statuses"] == [200],
        "malformed all 4xx": all(400 <= s < 500 for s in report["malformed"]["statuses"]),
        "malformed < 3 s": report["malformed"]["max_ms"] < MALFORMED_LIMIT_S * 1e3,
        "chunked oversize 413": report["chunked_oversize"]["status"] == 413,
        "server stayed up": report["server_alive_after"],
    }
    report["targets"] = checks
    print(json.dumps(report, indent=2))
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
