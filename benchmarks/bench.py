"""Broadprop against the article's own computation, measured in one process, side by side.

    .venv/bin/python benchmarks/bench.py            # or: ./scripts/bench   (about 30-60 s)
    .venv/bin/python benchmarks/bench.py --full     # and memory, payload, batch growth

The anchor is what a learner waits for in a warm notebook: the article's computation run in
this very process (randn inputs, forward, the literal broadcast backward, autograd, the
comparison; `article_script`). Beside it, in interleaved rounds (so drifts in the machine's load
hit every side alike), the same run asked of Broadprop two ways:
- `live`: `python -m app` on a free loopback port (tests/servers.py: LiveServer), as served
  (the connection guard on), over one kept-alive connection, taking gzip as a browser, requests
  and httpx do: the way a user waits;
- `in-process`: the same app in this process through Starlette's TestClient (no sockets):
  the server's own share.
Each row prints warm (the median of the rounds) and cold (each side's first, after start-up),
and its ratio to the anchor: the article's run (`{}`) and `strategy: matmul` against the
article's computation; makemore exercise 1 (`POST /api/program`) against the same work done
in-process (benchmarks/program_bench.py: `plain_script`). Only ratios within one run mean
anything on a shared machine; the load average is printed beside them.

`--full` adds, each on a fresh server: the peak extra memory of a request (VmHWM over VmRSS,
/proc; the article's run on three fresh servers, judged on the largest) beside the article
script's own, the payload, and batch 1k / 5k / 20k.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: tests.* from the repository root
from tests.servers import LiveServer  # noqa: E402

MB = 1e6

# ------------------------------------------------------------------ the article's script


def article_script(batch: int = 1000, n_in: int = 784, n_hidden: int = 50) -> bool:
    """The article, literally: data, forward, the broadcast backward, autograd, compare."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, n_in, generator=g)
    y = torch.randn(batch, generator=g)
    w1, b1 = torch.randn(n_in, n_hidden, generator=g), torch.randn(n_hidden, generator=g)
    w2, b2 = torch.randn(n_hidden, 1, generator=g), torch.randn(1, generator=g)

    def lin(x, w, b):
        return x @ w + b

    def lin_grad(inp, out, w, b):
        inp.g = (out.g.unsqueeze(1) * w).sum(-1)
        w.g = (inp.unsqueeze(-1) * out.g.unsqueeze(1)).sum(0)
        b.g = out.g.sum(0)

    l1 = lin(x, w1, b1)
    l2 = l1.clamp_min(0.0)
    out = lin(l2, w2, b2)
    loss = (out.squeeze(-1) - y).pow(2).mean()  # noqa: F841
    out.g = 2.0 * (out.squeeze(-1) - y).unsqueeze(-1) / x.shape[0]
    lin_grad(l2, out, w2, b2)
    l1.g = (l1 > 0).float() * l2.g
    lin_grad(x, l1, w1, b1)

    leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
    xt, w1t, b1t, w2t, b2t = leaves
    ref = (lin(lin(xt, w1t, b1t).relu(), w2t, b2t).squeeze(-1) - y).pow(2).mean()
    ref.backward()
    manual = [x.g, w1.g, b1.g, w2.g, b2.g]
    return all(torch.allclose(m, t.grad, rtol=1e-4, atol=1e-3) for m, t in zip(manual, leaves))


# ------------------------------------------------------------------ the server


def proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux: clear_refs 5)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# as a browser asks, and requests and httpx by default: the answer comes gzipped
REQUEST_HEADERS = {"content-type": "application/json", "accept-encoding": "gzip"}


class Server(LiveServer):
    """`python -m app` as served (the connection guard on), with one kept-alive connection,
    asking for gzip as browsers and HTTP libraries do (the timing includes the decompression)."""

    def __init__(self) -> None:
        super().__init__()
        self.http = self.conn()

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    busy = 0  # 503s asked again (a machine busy with other work), reported at the end

    def post(self, body: dict, path: str = "/api/run") -> tuple[float, int, bytes]:
        """One request, asked again after its Retry-After while the server answers 503 (it
        does when a busy machine cannot give a run its CPU time): the time is the answered
        request's."""
        for _ in range(10):
            elapsed, status, payload, retry_after = self._post_once(body, path)
            if status != 503:
                break
            Server.busy += 1
            time.sleep(float(retry_after or 1))
        return elapsed, status, payload

    def _post_once(self, body: dict, path: str) -> tuple[float, int, bytes, str | None]:
        """One request on the kept-alive connection; when the server has closed it (its
        keep-alive timeout passed while this machine was busy elsewhere), a new one."""
        data = json.dumps(body).encode()
        for attempt in range(2):
            start = time.perf_counter()
            try:
                self.http.request("POST", path, data, REQUEST_HEADERS)
                response = self.http.getresponse()
                payload = response.read()
                self.wire_bytes = len(payload)
                if response.getheader("content-encoding") == "gzip":
                    payload = gzip.decompress(payload)  # (the client's share of the wait)
                elapsed = time.perf_counter() - start
                return elapsed, response.status, payload, response.getheader("retry-after")
            except (OSError, http.client.HTTPException):
                self.http.close()
                self.http = self.conn()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def peak_extra(self, body: dict) -> int | None:
        """Bytes the server's resident set grew to above where it stood, for one request."""
        pid = self.proc.pid
        if not reset_peak(pid):
            return None
        before = proc_kb(pid, "VmRSS")
        _, status, _ = self.post(body)
        assert status == 200, status
        return (proc_kb(pid, "VmHWM") - before) * 1024

    def close(self) -> None:
        self.http.close()
        self.stop()


def fresh_server_peak_extra(body: dict) -> int | None:
    """Peak extra memory of one request on a server that has served nothing else (but its
    start-up warm-up): on a warm server the allocator reuses what earlier requests freed,
    and the growth of the resident set says little."""
    server = Server()
    try:
        return server.peak_extra(body)
    finally:
        server.close()


def article_script_peak_extra() -> int | None:
    """The article script's peak extra memory, in a fresh process of its own."""
    code = (
        "import sys, pathlib; sys.path.insert(0, 'benchmarks'); import torch; "
        "from bench import article_script, proc_kb; import os; pid = os.getpid(); "
        "article_script(batch=10); before = proc_kb(pid, 'VmRSS'); article_script(); "
        "print((proc_kb(pid, 'VmHWM') - before) * 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    return int(out.stdout.strip()) if out.returncode == 0 else None


# ------------------------------------------------------------------ the report


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / MB:.1f} MB"


class InProcess:
    """The same app in this process, through Starlette's TestClient (no sockets): `post` as
    `Server.post`, timed around the call."""

    def __init__(self) -> None:
        from fastapi.testclient import TestClient

        from app.main import create_app

        self.client = TestClient(create_app())
        self.client.__enter__()  # the lifespan: lanes, warm-up, sandbox workers

    def post(self, body: dict, path: str = "/api/run") -> tuple[float, int, bytes]:
        start = time.perf_counter()
        response = self.client.post(path, json=body)
        elapsed = time.perf_counter() - start
        return elapsed, response.status_code, response.content

    def close(self) -> None:
        self.client.__exit__(None, None, None)


class Row:
    """One side of the comparison: a name, its cold (first) time and its warm ones."""

    def __init__(self, name: str, call, target: float | None = None) -> None:
        self.name, self.call, self.target = name, call, target
        self.cold = self.timed_call()
        self.warm: list[float] = []

    def timed_call(self) -> float:
        start = time.perf_counter()
        self.call()
        return time.perf_counter() - start

    def line(self, anchor: Row) -> str:
        warm, base = statistics.median(self.warm), statistics.median(anchor.warm)
        ratio = warm / base
        verdict = ""
        if self.target is not None:
            verdict = f"(target <= {self.target}x: {'PASS' if ratio <= self.target else 'MISS'})"
        return (
            f"  {self.name:<36}{warm * 1e3:8.1f} ms  {ratio:6.2f}x  "
            f"{self.cold * 1e3:8.1f} ms  {self.cold / anchor.cold:6.2f}x  {verdict}"
        )


def api_call(side, body: dict, path: str = "/api/run"):
    def call() -> None:
        _, status, _ = side.post(body, path)
        assert status == 200, (path, body, status)

    return call


def interleave(rows: list[Row], rounds: int) -> None:
    """`rounds` rounds of every row, one after the other (one warm-up round first)."""
    for r in range(rounds + 1):
        for row in rows:
            t = row.timed_call()
            if r:
                row.warm.append(t)


def print_table(title: str, rows: list[Row]) -> None:
    anchor, *others = rows
    print(title)
    print(f"  {'':<36}{'warm':>11}  {'ratio':>7}  {'cold':>11}  {'ratio':>7}")
    print(anchor.line(anchor))
    for row in others:
        print(row.line(anchor))


def makemore():
    """The makemore exercise-1 request and the same work in-process (program_bench)."""
    from program_bench import STUDENT_BACKWARD, plain_script

    from app.programs import presets
    from app.programs.inputs import make_inputs
    from app.programs.schemas import ProgramRequest

    request = {**presets.preset("makemore")["request"], "backward": STUDENT_BACKWARD}
    made = make_inputs(ProgramRequest(**request).inputs, 0, "float32")

    def script() -> None:
        assert plain_script(made)

    return request, script


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--full", action="store_true", help="memory, payload, batch growth")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    load_before = os.getloadavg()[0]
    started = time.perf_counter()

    # the two servers start side by side (the live one in a thread while this one starts)
    starting = concurrent.futures.ThreadPoolExecutor(1).submit(Server)
    local = InProcess()
    live = starting.result()
    try:
        # cold: each side's first (the script's first call in this process; each server's
        # first request, after its own start-up warm-up)
        article = [
            Row("article's computation, in-process", article_script),
            Row("POST /api/run {}, live", api_call(live, {}), 0.3),
            Row("POST /api/run {}, in-process", api_call(local, {})),
            Row("POST /api/run matmul, live", api_call(live, {"strategy": "matmul"}), 0.15),
            Row("POST /api/run matmul, in-process", api_call(local, {"strategy": "matmul"})),
        ]
        request, script = makemore()
        program = [
            Row("makemore exercise 1, in-process", script),
            Row("POST /api/program, live", api_call(live, request, "/api/program"), 4),
            Row("POST /api/program, in-process", api_call(local, request, "/api/program")),
        ]
        interleave(article, args.repeats)
        interleave(program, args.repeats)
        _, _, payload = live.post({})
        payload_wire = live.wire_bytes
        assert json.loads(payload)["check"]["all_close"], "the article's run fails its check"
        _, _, program_payload = live.post(request, "/api/program")
        program_wire = live.wire_bytes
    finally:
        local.close()
    took = time.perf_counter() - started
    print(f"Broadprop benchmark, {os.cpu_count()} cores, torch {torch.__version__}, median of "
          f"{args.repeats} interleaved rounds, load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after ({took:.0f} s)\n")  # fmt: skip
    print_table("Article's run (batch 1000, 784 -> 50 -> 1, mse) against the article's "
                "computation in this process", article)  # fmt: skip
    print()
    print_table("makemore exercise 1 (26 gradients, batch 32) against the same work in this "
                "process", program)  # fmt: skip
    print(f"\n  payload: article {len(payload) / 1e3:.1f} KB (target < 300 KB: "
          f"{'PASS' if len(payload) < 300e3 else 'MISS'}; {payload_wire / 1e3:.1f} KB gzipped), "
          f"makemore {len(program_payload) / 1e3:.1f} KB ({program_wire / 1e3:.1f} KB gzipped)")  # fmt: skip
    try:
        if args.full:
            full(live)
    finally:
        live.close()
    if Server.busy:
        print(f"\n({Server.busy} answers were 503, the machine too busy to run them in time, "
              "and were asked again after their Retry-After)")  # fmt: skip
    return 0


PEAK_SERVERS = 3


def full(server: Server) -> None:
    """Memory (fresh servers), batch growth, the server's own strategy comparison."""
    script = statistics.median(timed(article_script) for _ in range(3))
    # three fresh servers: one run's figure moves with how its two threads shared the work
    # (23.8-29.5 MB for the same code); the verdict on the largest
    peaks = [fresh_server_peak_extra({}) for _ in range(PEAK_SERVERS)]
    server_peak = None if None in peaks else max(peaks)
    script_peak = article_script_peak_extra()
    verdict = (
        ""
        if server_peak is None
        else f"(target <= 32 MB: {'PASS' if server_peak <= 32e6 else 'MISS'})"
    )
    each = ", ".join(fmt_bytes(p) for p in peaks)
    print(f"\n  server peak extra memory, default strategy   {fmt_bytes(server_peak)} {verdict}"
          f" (the largest of {PEAK_SERVERS} fresh servers: {each})")  # fmt: skip
    print(f"  article's script peak extra memory           {fmt_bytes(script_peak)}")

    print("\nHow it grows with the batch (API round trip; server peak extra memory)")
    print("  (first: the first request at this size on this server; warm: the least of 3 more)")
    print(f"  {'batch':>6} {'strategy':<10} {'first':>9} {'warm':>9} {'x script':>9} "
          f"{'peak extra':>11}")  # fmt: skip
    for batch in (1000, 5000, 20000):
        for s in ("broadcast", "matmul"):
            body = {"batch": batch, "strategy": s}
            first = server.post(body)[0]
            t = min(server.post(body)[0] for _ in range(3))
            peak = fresh_server_peak_extra(body)
            print(
                f"  {batch:>6} {s:<10} {first * 1e3:7.1f}ms {t * 1e3:7.1f}ms "
                f"{t / script:8.2f}x {fmt_bytes(peak):>11}"
            )
            if batch == 20000 and s == "broadcast":
                ok = t / script <= 8 and (peak is None or peak <= 400e6)
                print(f"  {'':>6} target at 20000: <= 8x the article's script and <= 400 MB: "
                      f"{'PASS' if ok else 'MISS'}")  # fmt: skip

    _, _, payload = server.post({"compare": True})
    compare = json.loads(payload)["compare"]
    print("\nThe server's own comparison (compare: true, article's run)")
    for name, row in compare["strategies"].items():
        print(f"  {name:<10} backward {row['backward_ms']:7.2f} ms   "
              f"peak extra {fmt_bytes(row['peak_extra_bytes'])}")  # fmt: skip
    print(f"  the literal broadcast product would take "
          f"{fmt_bytes(compare['literal_broadcast_bytes'])}; chunks are capped at "
          f"{fmt_bytes(compare['chunk_bytes'])}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
