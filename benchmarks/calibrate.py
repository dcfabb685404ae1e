"""The work model (app/cost/work.py) against measured runs on this machine.

    PYTHONPATH=. .venv/bin/python benchmarks/calibrate.py [--repeats 2]

For each config: the model's estimate of the seconds a run holds its slot, and the measured
time of pipeline.run (the fastest of `repeats`, after one warm-up run), on the server's own
thread count. A ratio measured/model above 1 means the model is optimistic for that config;
the model is meant to stay at or under 1 (its limit decides what is refused) and the run
deadline stops what it misjudges.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's app/
from app.cost import work  # noqa: E402
from app.runs import pipeline  # noqa: E402
from app.schemas import RunRequest  # noqa: E402
from app.server.lanes import derive_concurrency  # noqa: E402
from app.settings import Settings  # noqa: E402

CONFIGS = [
    {},
    {"batch": 20000},
    {"batch": 20000, "strategy": "matmul"},
    {"batch": 5000, "compare": True},
    {"fd_samples": 64},
    {"batch": 64, "in_features": 40, "hidden": [1], "norm": "layernorm"},
    {"batch": 2000, "in_features": 256, "hidden": [256, 256], "norm": "batchnorm"},
    {"batch": 300, "in_features": 1024, "hidden": [1024]},
    {"batch": 8, "in_features": 2048, "hidden": [2048]},
    {"batch": 4, "in_features": 4096, "hidden": [4096]},
    {"batch": 16, "in_features": 4096, "hidden": [4096], "dtype": "float64"},
    {"batch": 200, "in_features": 1024, "hidden": [1024] * 4, "strategy": "matmul"},
    {"batch": 3000, "in_features": 100, "hidden": [400], "dtype": "float64"},
    {"batch": 3000, "in_features": 100, "hidden": [400], "loss": "cross_entropy",
     "out_features": 1000},
    {"batch": 50000, "in_features": 784, "hidden": [1]},
    {"batch": 200000, "in_features": 16, "hidden": [16, 16]},
    {"batch": 500, "in_features": 200, "hidden": [400], "fd_samples": 64},
    {"batch": 100, "in_features": 64, "hidden": [64] * 8, "fd_samples": 64,
     "norm": "layernorm"},
    # issue 25: compare and wide layers (the config with compare off: it is refused)
    {"batch": 2, "in_features": 128, "hidden": [4096, 4096], "out_features": 3000,
     "activation": "sigmoid", "norm": "batchnorm"},
    {"batch": 2, "in_features": 128, "hidden": [4096], "out_features": 3000, "compare": True},
    {"batch": 2, "in_features": 2000, "hidden": [1000], "compare": True},
    {"batch": 11, "in_features": 4096, "hidden": [4096]},
    {"batch": 200, "in_features": 512, "hidden": [512], "compare": True},
]  # fmt: skip


def measure(cfg: RunRequest, repeats: int, chunk_bytes: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process), each the least of `repeats`. On a
    machine shared with other work, CPU time over the thread count tells what wall time
    would be on a quiet one."""
    pipeline.run(cfg, chunk_bytes)
    wall = cpu = float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        pipeline.run(cfg, chunk_bytes)
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    settings = Settings()
    threads = derive_concurrency(settings).torch_threads
    torch.set_num_threads(threads)
    print(f"{'config':<90} {'model':>7} {'wall':>7} {'cpu/thr':>7} {'ratio':>6}")
    worst = 0.0
    for fields in CONFIGS:
        cfg = RunRequest(**fields)
        model = work.estimate(cfg, settings.chunk_bytes)
        expected = model.total - model.recheck  # the recheck runs only on a failed check
        wall, cpu = measure(cfg, args.repeats, settings.chunk_bytes)
        quiet = min(wall, cpu / threads)
        worst = max(worst, quiet / expected)
        print(
            f"{str(fields)[:90]:<90} {expected:7.3f} {wall:7.3f} {cpu / threads:7.3f} "
            f"{quiet / expected:6.2f}",
            flush=True,
        )
    print(
        f"\nworst measured/model: {worst:.2f} (the model's limit: {work.WORK_LIMIT_S} s); "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
