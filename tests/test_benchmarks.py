"""Every benchmark starts as `./scripts/bench` runs it, from the repository root: `python
benchmarks/<name>.py`, with only the script's own folder on the path (no PYTHONPATH, no
pytest), so its imports work on a fresh clone; so does the screenshots script. (Each runs as
that command would, forked from a warm interpreter that has imported torch and nothing of
ours: tests/scripts.py.) `--help` parses its arguments and exits before any measuring."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.scripts import run_script

# starts every benchmark as a script
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))
# the README's other script: it retakes the screenshots
SCRIPTS = [*BENCHMARKS, ROOT / "tests" / "browser" / "screenshots.py"]


def test_there_are_benchmarks():
    assert {p.stem for p in BENCHMARKS} >= {"bench", "load", "page_bench", "hardening"}


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_every_benchmark_imports_as_a_script(script):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = run_script([script.relative_to(ROOT), "--help"], cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage:" in result.stdout
