"""A class against `python -m app` on loopback (not part of the tests), and the served server
the hardening steps share (benchmarks/hardening.py runs these as its steps class and pages).

    .venv/bin/python benchmarks/classroom.py [--pages 40] [--only class pages]

- class: N page loads' requests at once from one process (the page, its assets, its run, 503s
  waited out as the page does): the server's part of a class, p50/p95/max;
- pages: N page loads at once in headless Chromium, each until drawn (503s waited out by the
  page), with their p50/p95/max, and the CPU time the server and the machine spent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx  # the dev extra's HTTP client (an httpx fork with its API)
import psutil

ROOT = Path(__file__).resolve().parent.parent


def quantiles(times: list[float]) -> dict:
    """median and max, in ms."""
    if not times:
        return {"n": 0}
    return {"n": len(times), "median_ms": ms(statistics.median(times)), "max_ms": ms(max(times))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, **env: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app"],
            cwd=ROOT,
            env={**os.environ, "BROADPROP_PORT": str(self.port), **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise SystemExit("the server did not start")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, float, int]:
        """(status, seconds, bytes) on a fresh connection (no keep-alive to outlive)."""
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        data = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if data is not None else {}
        start = time.perf_counter()
        try:
            conn.request(method, path, data, headers)
            response = conn.getresponse()
            payload = response.read()
            return response.status, time.perf_counter() - start, len(payload)
        finally:
            conn.close()

    def post(self, body: dict) -> tuple[int, float, int]:
        return self.request("POST", "/api/run", body)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 1)


async def _pages(base: str, n: int) -> dict:
    from playwright.async_api import async_playwright

    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]  # fmt: skip
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        busy = 0
        errors: list[str] = []

        statuses: dict[int, int] = {}

        failed: dict[str, int] = {}

        def fail(request) -> None:
            what = f"{request.url.removeprefix(base)} {request.failure}"
            failed[what] = failed.get(what, 0) + 1

        def count(response) -> None:
            nonlocal busy
            if response.url.endswith("/api/run"):
                busy += response.status == 503
                statuses[response.status] = statuses.get(response.status, 0) + 1

        async def one(context) -> float | None:
            page = await context.new_page()
            page.on("response", count)
            page.on("requestfailed", fail)
            start = time.perf_counter()
            await page.goto(base + "/", timeout=300_000, wait_until="commit")
            try:
                await page.wait_for_function(
                    "() => document.body && document.body.dataset.state === 'ready'"
                    " && document.querySelector('#loading').hidden"
                    " && document.querySelectorAll('.heatmap-card .main-svg').length > 0",
                    timeout=300_000,
                )
            except Exception as e:  # not drawn in time: say what the page showed
                shown = await page.evaluate(
                    "() => [document.body && document.body.dataset.state,"
                    " (document.querySelector('#run-error') || {}).innerText,"
                    " (document.querySelector('#loading') || {}).innerText]"
                )
                errors.append(f"{type(e).__name__}: page showed {shown}")
                return None
            return time.perf_counter() - start

        contexts = [await browser.new_context() for _ in range(n)]
        times = await asyncio.gather(*(one(c) for c in contexts))
        await browser.close()
    drawn = sorted(t for t in times if t is not None)

    def pick(q: float) -> float:
        return ms(drawn[min(len(drawn) - 1, int(q * len(drawn)))]) if drawn else float("nan")

    return {
        "pages": n,
        "drawn": len(drawn),
        "errors": sorted(set(errors))[:5],
        "failed_requests": failed,
        "503s_waited_out": busy,
        "api_run_statuses": statuses,
        "p50_ms": pick(0.5),
        "p95_ms": pick(0.95),
        "max_ms": ms(drawn[-1]) if drawn else None,
        "mean_ms": ms(statistics.fmean(drawn)) if drawn else None,
    }


async def _class(base: str, n: int) -> dict:
    """N page loads' requests (the page, its assets, then its run with the page's 503 retry
    after Retry-After plus up to a second) from one process: the server's part of a class
    whose browsers each have their own machine."""
    limits = httpx.Limits(max_connections=6 * n)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
        html = (await client.get("/")).text
        assets = re.findall(r'(?:src|href)="(/(?:static|vendor)/[^"]+)"', html)

        async def one() -> tuple[int, float, int]:
            start = time.perf_counter()
            await client.get("/")
            await asyncio.gather(*(client.get(a) for a in assets))
            retries = 0
            while True:
                r = await client.post("/api/run", json={"reference_heatmaps": True})
                if r.status_code != 503:
                    return r.status_code, time.perf_counter() - start, retries
                retries += 1
                await asyncio.sleep(int(r.headers["retry-after"]) + random.random())

        results = await asyncio.gather(*(one() for _ in range(n)))
    times = sorted(t for _, t, _ in results)
    return {
        "loads": n,
        "assets_each": len(assets),
        "statuses": sorted({s for s, _, _ in results}),
        "503s_waited_out": sum(r for _, _, r in results),
        "p50_ms": ms(times[len(times) // 2]),
        "p95_ms": ms(times[min(len(times) - 1, int(0.95 * len(times)))]),
        "max_ms": ms(times[-1]),
    }


def class_loads(n: int) -> dict:
    server = Server()
    try:
        server.request("GET", "/")
        return asyncio.run(_class(server.base, n))
    finally:
        server.stop()


def pages(n: int) -> dict:
    """With the CPU time the server and the whole machine spent meanwhile: the browsers share
    the server's cores here (in a class each has its own machine)."""
    server = Server()
    try:
        server.request("GET", "/")
        process = psutil.Process(server.proc.pid)
        server_before, machine_before = sum(process.cpu_times()[:2]), psutil.cpu_times()
        start = time.perf_counter()
        report = asyncio.run(_pages(server.base, n))
        machine_after = psutil.cpu_times()
        busy = sum(machine_after[:3]) - sum(machine_before[:3])  # user, nice, system
        report["seconds"] = round(time.perf_counter() - start, 1)
        report["server_cpu_s"] = round(sum(process.cpu_times()[:2]) - server_before, 1)
        report["machine_cpu_s"] = round(busy, 1)
        return report
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", type=int, default=40)
    parser.add_argument("--only", nargs="*", default=["class", "pages"], choices=["class", "pages"])
    args = parser.parse_args()
    steps = {"class": class_loads, "pages": pages}
    for name in args.only:
        print(json.dumps({name: steps[name](args.pages)}, indent=2), flush=True)


if __name__ == "__main__":
    main()
