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


def _readme_pictures() -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(docs/screenshots/([^)]+)\)", (ROOT / "README.md").read_text())


def test_every_readme_picture_is_kept_and_made_by_the_screenshot_script():
    """Issue 35.17: two pictures the README embedded were gitignored and made by nothing."""
    import ast

    source = (ROOT / "tests" / "browser" / "screenshots.py").read_text()
    tables = {
        t.id: ast.literal_eval(node.value)
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name) and t.id in ("README_PICTURES", "MADE_BY_TESTS")
    }
    made = {**tables["README_PICTURES"], **tables["MADE_BY_TESTS"]}
    pictures = _readme_pictures()
    assert pictures, "the README embeds no screenshots?"
    for picture in pictures:
        assert picture in made, f"{picture}: not made by tests/browser/screenshots.py"
        path = ROOT / "docs" / "screenshots" / picture
        assert path.is_file(), f"{picture} is missing"
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", str(path)], cwd=ROOT, capture_output=True
        )
        assert ignored.returncode == 1, f"{picture} is gitignored: a fresh clone lacks it"


def test_the_readmes_count_of_hostile_formulas_is_the_lists():
    """Issue 35.18: the README said 90 hostile formulas when the list had 103."""
    from tests.lab.test_lab_hostile import HOSTILE

    (said,) = re.findall(r"fires (\d+) hostile formulas", (ROOT / "README.md").read_text())
    assert int(said) == len(HOSTILE)
