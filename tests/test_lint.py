"""ruff is part of the test run (issue 35): a lint error or an unformatted module fails the
suite instead of waiting for someone to run ruff by hand."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    beside = Path(sys.executable).with_name("ruff")  # the venv's, as pyproject's dev extra has it
    found = str(beside) if beside.exists() else shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: pip install -e .[dev]", pytrace=False)
    return [found]


def test_ruff_check_passes():
    done = subprocess.run([*_ruff(), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format_leaves_the_code_as_it_is():
    paths = ["app", "tests", "benchmarks", "scripts"]
    cmd = [*_ruff(), "format", "--check", *[p for p in paths if (ROOT / p).exists()]]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
