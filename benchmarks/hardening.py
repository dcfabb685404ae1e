"""Issue 13's measurements against `python -m app` on loopback (not part of the tests).

    PYTHONPATH=. .venv/bin/python benchmarks/hardening.py [--unread 20] [--pages 40]

- unread: N clients ask for one of the largest answers the server gives (every heatmap at the
  response bound, float64) and never read it: the server's peak RSS while they
  hang, and how long until the server has dropped them all (send timeout);
- lanes: the article's run served alone, and while a giant (accepted) run holds the other lane;
- slowest: the largest accepted runs, each timed first (cold) and warm; the slowest 200;
- memory: RSS fresh, after big runs, and a moment later (malloc_trim) against a server with
  BROADPROP_RELEASE_MEMORY=false;
- class: N page loads' requests at once from one process (the page, its assets, its run, 503s
  waited out as the page does): the server's part of a class, p50/p95/max;
- pages: N page loads at once in headless Chromium, each until drawn (503s waited out by the
  page), with their p50/p95/max, and the CPU time the server and the machine spent
  (these two, and the served server every step starts, are benchmarks/classroom.py's).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import threading
import time
from pathlib import Path

import psutil
from classroom import Server, class_loads, ms, pages, quantiles  # the script's own folder

ROOT = Path(__file__).resolve().parent.parent
HEAVY = {
    "in_features": 1024,
    "hidden": [1024] * 8,
    "out_features": 1024,
    "strategy": "matmul",
    "reference_heatmaps": True,
    "max_cells": 1_000_000,
    "batch": 164,
}
# the largest answers quickly: one wide layer in float64, every heatmap at the response bound
WIDE = {**HEAVY, "hidden": [1024], "batch": 64, "dtype": "float64"}
GIANT = {
    "batch": 11,
    "in_features": 4096,
    "hidden": [4096],
}  # wide rows: the slowest kind (12 is refused since the draw of its weights is counted)
LARGE = [  # near the work limit, each of a different kind
    {"batch": 20000},
    {"batch": 20000, "strategy": "matmul"},
    GIANT,
    {"batch": 5000, "compare": True},
    {"fd_samples": 64},
    {"batch": 200, "in_features": 4096, "hidden": [4096], "strategy": "matmul"},
    {"batch": 800, "in_features": 1024, "hidden": [1024] * 4, "strategy": "matmul"},
]

# issue 25: the grads of an 8-layer layernorm net, for the largest formula bodies
BOMB_GRADS = (
    "out a8 w9 b9 n8 l8 gamma8 beta8 a7 w8 b8 n7 l7 gamma7 beta7 a6 w7 b7 n6 l6 gamma6 "
    "beta6 a5 w6 b6 n5 l5 gamma5 beta5 a4 w5 b5 n4 l4 gamma4 beta4 a3 w4 b4 n3 l3 gamma3"
).split()


def bomb_body(batch: int = 2) -> dict:
    """The largest formula body that fits in 64 KB (issue 25): 42 formulas of 18 lines of
    `.unsqueeze(0).squeeze(0)` chains each, on a small batch (the dry run is the cost)."""
    chain = "t = t" + ".unsqueeze(0).squeeze(0)" * 3

    def formula(name: str) -> str:
        return "\n".join([f"t = {name}", *[chain] * 18, "t"])

    return {
        "batch": batch,
        "hidden": [50] * 8,
        "norm": "layernorm",
        "formulas": {f"{n}.g": formula(n) for n in BOMB_GRADS},
    }


def unread(n: int) -> dict:
    server = Server(BROADPROP_MAX_CONCURRENT_RUNS="1", BROADPROP_QUEUE_WAIT_S="600")
    try:
        status, took, size = server.post(WIDE)
        heavy = server.post(HEAVY)  # the 189 MB answer, now bounded
        idle = server.rss()
        data = json.dumps(WIDE).encode()
        head = (
            f"POST /api/run HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        ).encode()
        clients = []
        for _ in range(n):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", server.port))
            s.sendall(head + data)
            clients.append(s)
        ports = {s.getsockname()[1] for s in clients}
        peak, start, seen = idle, time.monotonic(), 0
        while time.monotonic() - start < 600:
            peak = max(peak, server.rss())
            held = [
                c
                for c in psutil.Process(server.proc.pid).net_connections()
                if c.raddr and c.raddr.port in ports
            ]
            seen = max(seen, len(held))
            if seen and not held:  # all accepted, then all dropped
                break
            time.sleep(0.05)
        dropped_after = time.monotonic() - start
        after = server.rss()
        for s in clients:
            s.close()
        alive = server.request("GET", "/healthz")[0] == 200
        return {
            "clients": n,
            "answer_bytes": size,
            "answer_status": status,
            "issue_config_answer": {"status": heavy[0], "bytes": heavy[2], "ms": ms(heavy[1])},
            "rss_idle_mb": round(idle / 1e6, 1),
            "rss_peak_mb": round(peak / 1e6, 1),
            "most_held_at_once": seen,
            "all_dropped_after_s": round(dropped_after, 1),
            "rss_after_mb": round(after / 1e6, 1),
            "server_alive": alive,
        }
    finally:
        server.stop()


def lanes(repeats: int = 5) -> dict:
    server = Server()
    try:
        server.post({})
        server.post(GIANT)
        alone = min(server.post({})[1] for _ in range(repeats))
        beside, giant_times = [], []
        for _ in range(repeats):
            result: list = []
            giant = threading.Thread(target=lambda out=result: out.append(server.post(GIANT)))
            giant.start()
            time.sleep(0.3)  # the giant has its slot
            status, took, _ = server.post({})
            beside.append((status, took, giant.is_alive()))
            giant.join()
            giant_times.append(result[0][:2])
        return {
            "small_alone_ms": ms(alone),
            "small_beside_giant_ms": [ms(t) for _, t, _ in beside],
            "small_statuses": [s for s, _, _ in beside],
            "giant_still_running_when_small_done": [a for _, _, a in beside],
            "giant_ms": [ms(t) for _, t in giant_times],
            "giant_statuses": [s for s, _ in giant_times],
        }
    finally:
        server.stop()


def slowest() -> dict:
    rows = []
    for body in LARGE:
        server = Server()  # fresh: the first request at this size is the cold one
        try:
            first = server.post(body)
            warm = [server.post(body) for _ in range(3)]
            rows.append(
                {
                    "body": body,
                    "status": first[0],
                    "first_ms": ms(first[1]),
                    "warm_ms": [ms(t) for _, t, _ in warm],
                    "warm_statuses": sorted({s for s, _, _ in warm}),
                }
            )
        finally:
            server.stop()
    accepted = [r for r in rows if r["status"] == 200]
    worst = max(accepted, key=lambda r: max(r["first_ms"], *r["warm_ms"]), default=None)
    return {"runs": rows, "slowest_accepted": worst}


def memory() -> dict:
    out = {}
    for trim in ("true", "false"):
        server = Server(BROADPROP_RELEASE_MEMORY=trim)
        try:
            fresh = server.rss()
            for body in ({"batch": 20000}, {"batch": 20000, "strategy": "matmul"}, HEAVY):
                server.post(body)
            time.sleep(2)
            out[f"release_memory={trim}"] = {
                "rss_fresh_mb": round(fresh / 1e6, 1),
                "rss_idle_after_big_runs_mb": round(server.rss() / 1e6, 1),
            }
        finally:
            server.stop()
    return out


def _healthz_stall(server: Server, body: dict, after_s: float = 1.5) -> tuple[int, float]:
    """(the run's status, the slowest /healthz answer) while `body` runs and for `after_s`
    after it (the memory release comes TRIM_DELAY_S after a big run), polled every 20 ms."""
    slowest, done = [0.0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            slowest[0] = max(slowest[0], server.request("GET", "/healthz")[1])
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        status = server.post(body)[0]
        time.sleep(after_s)
    finally:
        done.set()
        poller.join()
    return status, slowest[0]


def gc_stall(fill: int = 60, repeats: int = 3) -> dict:
    """The slowest /healthz around a default run (a run over TRIM_MIN_BYTES releases memory
    TRIM_DELAY_S after it; the default run's pages stay until the server is idle), on a
    server whose trace cache is empty and then after `fill` distinct traces of the largest
    formula body (the issue: 2.8-3.1 s with 256 cached), and the RSS the traces added."""
    server = Server()
    try:
        server.post({})
        empty = [_healthz_stall(server, {}) for _ in range(repeats)]
        before = server.rss()
        start = time.perf_counter()
        statuses = sorted({server.post(bomb_body(batch))[0] for batch in range(1, fill + 1)})
        filled_in = time.perf_counter() - start
        full = [_healthz_stall(server, {}) for _ in range(repeats)]
        return {
            "traces_cached": fill,
            "fill_statuses": statuses,
            "fill_s": round(filled_in, 1),
            "rss_added_by_traces_mb": round((server.rss() - before) / 1e6, 1),
            "healthz_slowest_ms_cache_empty": [ms(t) for _, t in empty],
            "healthz_slowest_ms_cache_full": [ms(t) for _, t in full],
            "run_statuses": sorted({s for s, _ in empty + full}),
        }
    finally:
        server.stop()


def _article_times(server: Server, n: int) -> tuple[list[float], list[int]]:
    """`n` article runs in a row: their seconds and statuses."""
    results = [server.post({}) for _ in range(n)]
    return [t for _, t, _ in results], sorted({s for s, _, _ in results})


def dry_runs(clients: int = 4, runs: int = 20) -> dict:
    """The article run alone, then while `clients` clients send the largest formula bodies
    back to back, each a trace not cached (a batch of its own; the issue: 62 ms median alone,
    854 ms beside four)."""
    server = Server()
    try:
        server.post({})
        alone, alone_statuses = _article_times(server, runs)
        stop, bombs, batch = threading.Event(), [], iter(range(1, 100_000))
        lock = threading.Lock()

        def bomb() -> None:
            while not stop.is_set():
                with lock:
                    body = bomb_body(next(batch))
                bombs.append(server.post(body))

        threads = [threading.Thread(target=bomb) for _ in range(clients)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # the bombs are going
        loaded, loaded_statuses = _article_times(server, runs)
        stop.set()
        for t in threads:
            t.join()
        counts: dict[int, int] = {}
        for status, _, _ in bombs:
            counts[status] = counts.get(status, 0) + 1
        return {
            "article_alone": {**quantiles(alone), "statuses": alone_statuses},
            f"article_beside_{clients}_bomb_clients": {
                **quantiles(loaded),
                "statuses": loaded_statuses,
            },
            "median_ratio": round(statistics.median(loaded) / statistics.median(alone), 2),
            "bomb_statuses": counts,
            "bomb_ms": quantiles([t for _, t, _ in bombs]),
        }
    finally:
        server.stop()


TRAINING = {"data": "mnist", "loss": "cross_entropy", "init": "kaiming", "hidden": [64],
            "steps": 20000, "eval_every": 100}  # fmt: skip
MATMUL_20000 = {"batch": 20000, "strategy": "matmul"}


def training_beside(repeats: int = 5) -> dict:
    """A batch 20000 matmul run alone, then while a training streams (the issue: 503 for
    the training's whole length, up to 300 s); and the training's steps per second alone
    and beside the runs."""
    import http.client

    server = Server()
    try:
        server.post(MATMUL_20000)
        alone = [server.post(MATMUL_20000) for _ in range(repeats)]
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
        conn.request(
            "POST", "/api/train", json.dumps(TRAINING), {"Content-Type": "application/json"}
        )
        stream = conn.getresponse()
        events: list[dict] = []

        def read() -> None:
            try:
                for line in stream:
                    if line.startswith(b"data: "):
                        events.append(json.loads(line[6:]))
            except (OSError, AttributeError, ValueError):  # closed under it at the end
                pass

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while not events:
            time.sleep(0.05)
        time.sleep(2.0)
        rate_alone = events[-1].get("steps_per_s")
        beside = [server.post(MATMUL_20000) for _ in range(repeats)]
        rate_beside = events[-1].get("steps_per_s")
        conn.close()
        return {
            "matmul_20000_alone": {
                **quantiles([t for _, t, _ in alone]),
                "statuses": sorted({s for s, _, _ in alone}),
            },
            "matmul_20000_beside_training": {
                **quantiles([t for _, t, _ in beside]),
                "statuses": sorted({s for s, _, _ in beside}),
            },
            "training_status": stream.status,
            "training_steps_per_s_before_runs": rate_alone,
            "training_steps_per_s_after_runs": rate_beside,
            "training_events": len(events),
        }
    finally:
        server.stop()


SMALL_RUN = {"batch": 2, "in_features": 2, "hidden": [2]}


def _user_runs(server: Server, n: int) -> tuple[int, list[float]]:
    """`n` small runs from 127.0.0.1, each on a fresh connection: how many were answered
    (200), and their seconds."""
    answered, times = 0, []
    for _ in range(n):
        try:
            status, took, _ = server.post(SMALL_RUN)
        except OSError:  # reset or refused
            continue
        answered += status == 200
        times.append(took)
    return answered, times


def client_share(silent: int = 600, runs: int = 20) -> dict:
    """A user's runs from 127.0.0.1 alone, then while 127.0.0.2 keeps `silent` silent
    sockets open, reopening each one the server drops (the issue: 1 success in 20 s)."""
    server = Server()
    try:
        alone, alone_times = _user_runs(server, runs)
        stop, held, lock = threading.Event(), [], threading.Lock()
        opened = [0]

        def attacker() -> None:
            while not stop.is_set():
                with lock:
                    alive = []
                    for s in held:  # drop those the server closed
                        try:
                            s.setblocking(False)
                            gone = s.recv(1) == b""
                        except BlockingIOError:
                            gone = False
                        except OSError:
                            gone = True
                        if gone:
                            s.close()
                        else:
                            alive.append(s)
                    held[:] = alive
                    while len(held) < silent and not stop.is_set():
                        s = socket.socket()
                        s.bind(("127.0.0.2", 0))
                        try:
                            s.connect(("127.0.0.1", server.port))
                        except OSError:
                            s.close()
                            break
                        held.append(s)
                        opened[0] += 1
                time.sleep(0.2)

        thread = threading.Thread(target=attacker)
        thread.start()
        time.sleep(3.0)  # the attacker has its sockets
        loaded, loaded_times = _user_runs(server, runs)
        stop.set()
        thread.join()
        for s in held:
            s.close()
        return {
            "user_answered_alone": f"{alone}/{runs}",
            "user_answered_beside_600_silent_sockets": f"{loaded}/{runs}",
            "user_ms_alone": quantiles(alone_times),
            "user_ms_beside": quantiles(loaded_times),
            "attacker_sockets_opened": opened[0],
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unread", type=int, default=20)
    parser.add_argument("--pages", type=int, default=40)
    parser.add_argument(
        "--only",
        nargs="*",
        default=[
            "unread",
            "lanes",
            "slowest",
            "memory",
            "class",
            "pages",
            "gc",
            "dry",
            "train",
            "share",
        ],
    )
    args = parser.parse_args()
    report: dict = {"cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0]}
    steps = {
        "unread": lambda: unread(args.unread),
        "lanes": lanes,
        "slowest": slowest,
        "memory": memory,
        "class": lambda: class_loads(args.pages),
        "gc": gc_stall,
        "dry": dry_runs,
        "train": training_beside,
        "share": client_share,
        "pages": lambda: pages(args.pages),
    }
    for name in args.only:
        report[name] = steps[name]()
        print(json.dumps({name: report[name]}, indent=2), flush=True)
    report["load_average_1m_after"] = os.getloadavg()[0]
    print(
        json.dumps({"load_average": [report["load_average_1m"], report["load_average_1m_after"]]})
    )


if __name__ == "__main__":
    main()
