"""A light run beside a formula flood (issue 34): the article's run, alone and while clients
send the largest formula bodies, measured on `python -m app` on loopback.

    .venv/bin/python benchmarks/flood.py [--clients 4] [--runs 15]   # about 30-50 s

Each flood request is benchmarks/hardening.py's `bomb_body`: 42 formulas of 18 lines each in a
64 KB body, a legal run, each with a batch of its own (so no trace is cached). Prints the
article run's median and max alone and during the flood (target: median <= 300 ms), and the
flood's statuses and times, with the load average beside them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

from classroom import Server, quantiles  # the script's own folder
from hardening import bomb_body

TARGET_MS = 300


def article_times(server: Server, n: int) -> tuple[list[float], list[int]]:
    results = [server.request("POST", "/api/run", {}) for _ in range(n)]
    return [t for _, t, _ in results], sorted({s for s, _, _ in results})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4, help="flooding clients")
    parser.add_argument("--runs", type=int, default=15, help="article runs each way")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    server = Server()
    try:
        server.request("POST", "/api/run", {})
        alone, _ = article_times(server, args.runs)
        stop, floods, batch, lock = threading.Event(), [], iter(range(1, 100_000)), threading.Lock()

        def flood() -> None:
            while not stop.is_set():
                with lock:
                    body = bomb_body(next(batch))
                floods.append(server.request("POST", "/api/run", body))

        threads = [threading.Thread(target=flood) for _ in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # the flood is going
        loaded, statuses = article_times(server, args.runs)
        stop.set()
        for t in threads:
            t.join()
    finally:
        server.stop()
    counts: dict[int, int] = {}
    for status, _, _ in floods:
        counts[status] = counts.get(status, 0) + 1
    median = statistics.median(loaded) * 1e3
    print(f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after, {os.cpu_count()} cores")
    print(f"  article's run alone:          {quantiles(alone)}")
    print(f"  beside {args.clients} flooding clients:  {quantiles(loaded)} statuses {statuses}")
    print(f"  flood requests: {counts}, {quantiles([t for _, t, _ in floods])}")
    print(f"  median beside the flood {median:.0f} ms (target <= {TARGET_MS} ms): "
          f"{'PASS' if median <= TARGET_MS else 'MISS'}")  # fmt: skip


if __name__ == "__main__":
    main()
