"""Training with the manual gradients (POST /api/train) against a plain PyTorch loop.

    .venv/bin/python benchmarks/train_bench.py [--steps 2000] [--threads 1] [--repeat 2]

The issue's setting: MNIST 5k, 784 -> 50 -> 10, cross_entropy, kaiming, lr 0.1, batch 64.
Starts `python -m app` on a free loopback port (BROADPROP_TORCH_THREADS=threads) and, in
this process with the same thread count, a plain loop on the same data, the same initial
weights and the same minibatches: F.linear / relu / F.cross_entropy, loss.backward(),
torch.optim.SGD. The runs alternate (manual, torch, manual, torch, ...) and each keeps its best,
as the machine may be shared. Printed: steps/s (the training loop alone, from the stream's
first progress event to its last, and the whole request), their ratio to the torch loop, the
validation accuracy each reaches, and how long the first progress event took.

The manual loop also checks that step's gradients against autograd every `eval_every` steps
and evaluates the 1,000 held-out images then; the torch loop evaluates at the same steps.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.engine.tensors import make_tensors  # noqa: E402
from app.runs.train import minibatches, split  # noqa: E402
from app.schemas import TrainRequest  # noqa: E402
from tests.servers import LiveServer  # noqa: E402

CONFIG = {"data": "mnist", "hidden": [50], "loss": "cross_entropy", "init": "kaiming",
          "lr": 0.1, "train_batch": 64}  # fmt: skip


def start_server(threads: int) -> LiveServer:
    server = LiveServer(
        start_s=120,
        BROADPROP_TORCH_THREADS=str(threads),
        BROADPROP_TRAIN_TIME_LIMIT_S="3600",
    )
    time.sleep(3)  # the warm-up and the data's background parse
    return server


def manual(port: int, body: dict) -> dict:
    """One POST /api/train, read event by event."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    sent = time.perf_counter()
    conn.request("POST", "/api/train", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()[:500]
    progress, first_at, done = [], None, None
    while True:
        line = response.readline()
        if not line:
            break
        if line.startswith(b"event: "):
            kind = line[7:].strip().decode()
            data = json.loads(response.readline()[6:])
            now = time.perf_counter()
            if kind == "progress":
                first_at = first_at or now
                progress.append((now, data))
            elif kind == "done":
                done = data
                break
    end = time.perf_counter()
    (t1, p1), (tn, pn) = progress[0], progress[-1]
    return {
        "loop_steps_per_s": (pn["step"] - p1["step"]) / (tn - t1),
        "request_steps_per_s": done["steps"] / (end - sent),
        "val_accuracy": done["val_accuracy"],
        "first_event_s": first_at - sent,
        "all_close": all(p["all_close"] for _, p in progress),
        "max_rel_err": max(p["max_rel_err"] for _, p in progress),
    }


def torch_loop(steps: int, eval_every: int) -> dict:
    """The same training with autograd and torch.optim.SGD."""
    cfg = TrainRequest(**CONFIG, steps=steps, eval_every=eval_every)
    tensors = make_tensors(cfg)
    parts = split(cfg, tensors)
    w1, b1, w2, b2 = (tensors[n].clone().requires_grad_() for n in ("w1", "b1", "w2", "b2"))
    optimizer = torch.optim.SGD([w1, b1, w2, b2], lr=cfg.lr)
    batches = minibatches(parts.x_train.shape[0], cfg.train_batch, cfg.seed)

    def forward(x):
        return F.linear(torch.relu(F.linear(x, w1.T, b1)), w2.T, b2)

    start = time.perf_counter()
    first = None
    for step in range(1, steps + 1):
        idx = next(batches)
        loss = F.cross_entropy(forward(parts.x_train[idx]), parts.t_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1 or step % eval_every == 0 or step == steps:
            with torch.no_grad():
                out = forward(parts.x_val)
                F.cross_entropy(out, parts.t_val).item()
                accuracy = (out.argmax(-1) == parts.t_val).double().mean().item()
            if step == 1:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"loop_steps_per_s": (steps - 1) / (end - first), "val_accuracy": accuracy,
            "total_steps_per_s": steps / (end - start)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    server = start_server(args.threads)
    port = server.port
    best: dict[str, dict] = {}

    def keep(name: str, result: dict) -> None:
        if name not in best or result["loop_steps_per_s"] > best[name]["loop_steps_per_s"]:
            best[name] = result

    try:
        for _ in range(args.repeat):
            for strategy in ("matmul", "broadcast"):
                body = {**CONFIG, "strategy": strategy, "steps": args.steps,
                        "eval_every": args.eval_every}  # fmt: skip
                keep(f"/api/train, manual, {strategy}", manual(port, body))
                keep("torch loop (autograd + optim.SGD)", torch_loop(args.steps, args.eval_every))
    finally:
        server.stop()

    reference = best["torch loop (autograd + optim.SGD)"]["loop_steps_per_s"]
    print(f"\nMNIST 5k, 784 -> 50 -> 10, cross_entropy, kaiming, lr 0.1, batch 64, "
          f"{args.steps} steps, eval_every {args.eval_every}, {args.threads} torch thread(s), "
          f"best of {args.repeat}\n")  # fmt: skip
    print(
        "| loop | steps/s (loop) | vs torch | steps/s (whole request) | val accuracy "
        "| first progress event | check |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, r in best.items():
        whole = r.get("request_steps_per_s", r.get("total_steps_per_s"))
        first = f"{r['first_event_s'] * 1e3:.0f} ms" if "first_event_s" in r else "–"
        check = (f"all_close, max rel err {r['max_rel_err']:.1e}" if "all_close" in r
                 and r["all_close"] else "–" if "all_close" not in r else "FAILED")  # fmt: skip
        print(f"| {name} | {r['loop_steps_per_s']:.0f} | {r['loop_steps_per_s'] / reference:.2f}x "
              f"| {whole:.0f} | {r['val_accuracy']:.3f} | {first} | {check} |")  # fmt: skip


if __name__ == "__main__":
    main()
