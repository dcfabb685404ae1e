"""Broadprop against the article's own script, measured in one run on this machine.

    .venv/bin/python benchmarks/bench.py            # or: ./scripts/bench

Starts `python -m app` on a free loopback port (tests/servers.py: LiveServer) and prints, as ratios measured in this
run (the machine is shared and noisy, so only ratios within one run mean anything):
- the API round trip for the article's run, per strategy, against the article's script done
  in-process (randn, forward, the literal broadcast backward, autograd, compare): warm (the
  median of interleaved rounds) and cold (each side's first);
- the server's peak extra memory per request (VmHWM over VmRSS, /proc), each on a fresh
  server, and the article script's own, measured in a fresh process;
- the response payload;
- batch 1k / 5k / 20k, to show how time and memory grow.
"""

from __future__ import annotations

import argparse
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


class Server(LiveServer):
    """`python -m app` as served (the connection guard on), with one kept-alive connection."""

    def __init__(self) -> None:
        super().__init__()
        self.http = self.conn()

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    busy = 0  # 503s asked again (a machine busy with other work), reported at the end

    def post(self, body: dict) -> tuple[float, int, bytes]:
        """One request, asked again after its Retry-After while the server answers 503 (it
        does when a busy machine cannot give a run its CPU time): the time is the answered
        request's."""
        for _ in range(10):
            elapsed, status, payload, retry_after = self._post_once(body)
            if status != 503:
                break
            Server.busy += 1
            time.sleep(float(retry_after or 1))
        return elapsed, status, payload

    def _post_once(self, body: dict) -> tuple[float, int, bytes, str | None]:
        """One request on the kept-alive connection; when the server has closed it (its
        keep-alive timeout passed while this machine was busy elsewhere), a new one."""
        data = json.dumps(body).encode()
        for attempt in range(2):
            start = time.perf_counter()
            try:
                self.http.request("POST", "/api/run", data, {"content-type": "application/json"})
                response = self.http.getresponse()
                payload = response.read()
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds (median)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    server = Server()
    try:
        strategies = ["broadcast", "einsum", "matmul"]
        # cold: each side's first (the server's first request per strategy, after its own
        # start-up warm-up; the script's first call in this process)
        cold_script = timed(article_script)
        cold = {s: server.post({"strategy": s})[0] for s in strategies}
        for _ in range(2):  # warm both sides up
            article_script()
            for s in strategies:
                server.post({"strategy": s})
        script_times, api_times = [], {s: [] for s in strategies}
        for _ in range(args.repeats):  # interleaved, so drifts in load hit both sides alike
            script_times.append(timed(article_script))
            for s in strategies:
                elapsed, status, payload = server.post({"strategy": s})
                assert status == 200
                api_times[s].append(elapsed)
        script = statistics.median(script_times)
        _, _, payload = server.post({})
        article = json.loads(payload)
        assert article["check"]["all_close"], "the article's run does not pass its own check"

        print(f"Broadprop benchmark, {os.cpu_count()} cores, torch {torch.__version__}, "
              f"median of {args.repeats} interleaved rounds, "
              f"load average {os.getloadavg()[0]:.1f}\n")  # fmt: skip
        print("Article's run (batch 1000, 784 -> 50 -> 1, mse); warm: the median, cold: the first")
        print(f"  {'':<33}{'warm':>10}  {'x script':>8}   {'cold':>10}  {'x script':>8}")
        print(f"  article's script in-process      {script * 1e3:7.1f} ms     1.00x   "
              f"{cold_script * 1e3:7.1f} ms     1.00x")  # fmt: skip
        targets = {"broadcast": 0.3, "matmul": 0.15}
        results = {}
        for s in strategies:
            t = statistics.median(api_times[s])
            ratio = t / script
            target = targets.get(s)
            verdict = (
                ""
                if target is None
                else f"(target <= {target}x: {'PASS' if ratio <= target else 'MISS'})"
            )
            results[s] = ratio
            print(f"  API round trip, {s:<9}        {t * 1e3:7.1f} ms    {ratio:5.2f}x   "
                  f"{cold[s] * 1e3:7.1f} ms    {cold[s] / cold_script:5.2f}x  {verdict}")  # fmt: skip

        server_peak = fresh_server_peak_extra({})
        script_peak = article_script_peak_extra()
        verdict = (
            ""
            if server_peak is None
            else f"(target <= 32 MB: {'PASS' if server_peak <= 32e6 else 'MISS'})"
        )
        print(
            f"\n  server peak extra memory, default strategy   {fmt_bytes(server_peak)} {verdict}"
        )
        print(f"  article's script peak extra memory           {fmt_bytes(script_peak)}")
        print(f"  response payload                             {len(payload) / 1e3:.1f} KB "
              f"(target < 300 KB: {'PASS' if len(payload) < 300e3 else 'MISS'})")  # fmt: skip

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
    finally:
        server.close()
    if Server.busy:
        print(f"\n({Server.busy} answers were 503, the machine too busy to run them in time, "
              "and were asked again after their Retry-After)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
