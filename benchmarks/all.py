"""Every figure issue 34 judges, one benchmark after the other, then their verdicts together.

    .venv/bin/python benchmarks/all.py         # or: ./scripts/bench   (about 2-3 minutes)

Runs, each in a process of its own (the anchors are measured inside each, in-process and warm):
bench.py (the API against the article's computation and makemore's work, cold beside warm),
flood.py (the article's run beside 4 formula-flooding clients), page_bench.py (the page in
Chromium: a change to on screen, the first load) and memory.py (idle RSS). Prints every
script's own report, then each line that names a target, with the machine's load average.
A shared machine's figures only compare within one script's run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# each script with its arguments: bench.py's ratios over 15 interleaved rounds (its own default,
# 5, moves by 10% between runs on a shared machine)
SCRIPTS = [["bench.py", "--repeats", "15"], ["flood.py"], ["page_bench.py"], ["memory.py"]]


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    verdicts: list[tuple[str, str, float]] = []
    for script, *arguments in SCRIPTS:
        load = os.getloadavg()[0]
        print(f"\n===== {script} (load average {load:.1f})", flush=True)
        run = subprocess.run([sys.executable, str(HERE / script), *arguments],
                             capture_output=True, text=True, cwd=HERE.parent)  # fmt: skip
        print(run.stdout, end="", flush=True)
        if run.returncode not in (0, 1):  # 1: a target missed, said in its report
            print(run.stderr[-3000:], file=sys.stderr)
        verdicts += [(script, line.strip(), load) for line in run.stdout.splitlines()
                     if "target" in line and ("PASS" in line or "MISS" in line)]  # fmt: skip
    print(f"\n===== verdicts ({os.cpu_count()} cores)")
    for script, line, load in verdicts:
        print(f"  [{script}, load {load:.1f}] {line}")
    return 0 if all("MISS" not in line for _, line, _ in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
