"""OpenMP's wait policy and the deadline's clock (issue 28, N13): a batch-20000 article run's
CPU time (its own thread's: what the run deadline counts) and wall time, quiet and beside two
CPU hogs, in one process. Compare the policies in two runs:
`OMP_WAIT_POLICY=active python benchmarks/omp_wait.py` and `OMP_WAIT_POLICY=passive python
benchmarks/omp_wait.py` (app/__init__.py makes passive the default; the variable must be set
before torch loads)."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def hog() -> None:
    while True:
        pass


def measure(cfg, label: str) -> None:
    from app.runs import pipeline

    out: dict[str, float] = {}

    def work() -> None:
        cpu, wall = time.thread_time(), time.perf_counter()
        pipeline.run(cfg, 4 << 20, None)
        out["cpu_s"], out["wall_s"] = time.thread_time() - cpu, time.perf_counter() - wall

    thread = threading.Thread(target=work)  # a run's own thread, as a lane runs it
    thread.start()
    thread.join()
    print(f"{label:6s} cpu {out['cpu_s']:.2f} s  wall {out['wall_s']:.2f} s  "
          f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')})", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=20000)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    import app  # noqa: F401  (its default wait policy, set before torch loads)
    from app import schemas

    torch.set_num_threads(2)
    cfg = schemas.RunRequest(batch=args.batch)
    measure(cfg, "warm")
    measure(cfg, "quiet")
    hogs = [multiprocessing.Process(target=hog, daemon=True) for _ in range(2)]
    for h in hogs:
        h.start()
    try:
        time.sleep(0.5)
        measure(cfg, "hogs")
        measure(cfg, "hogs")
    finally:
        for h in hogs:
            h.terminate()


if __name__ == "__main__":
    main()
