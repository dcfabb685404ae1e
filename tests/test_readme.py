"""The README's examples run as written: its pytest suite for a teacher, from a fresh
directory with no BROADPROP_* variable set."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Using Broadprop from your own pytest suite"


def readme_block(heading: str) -> str:
    """The first ```python block after `heading` in the README."""
    text = (ROOT / "README.md").read_text()
    assert heading in text, f"the README has no section {heading!r}"
    after = text.split(heading, 1)[1]
    match = re.search(r"```python\n(.*?)```", after, re.S)
    assert match, f"no python block under {heading!r}"
    return match.group(1)


@pytest.mark.slow
def test_the_readmes_pytest_suite_passes_as_written(tmp_path):
    (tmp_path / "test_grading.py").write_text(readme_block(SECTION))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROADPROP_")}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            # TestClient over plain httpx warns (Starlette); the dev extra installs httpx2
            "-W",
            "error::starlette.exceptions.StarletteDeprecationWarning",
            "test_grading.py",
        ],  # fmt: skip
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert re.search(r"\b[1-9]\d* passed", out) and "failed" not in out, out[-3000:]


def test_the_test_client_imports_without_a_deprecation_warning():
    """Starlette's TestClient wants httpx2 (over plain httpx it warns on import)."""
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import fastapi.testclient"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
