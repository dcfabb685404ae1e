"""%%backward in a real JupyterLab, in headless Chromium (issue 33): JupyterLab (the dev extra's,
from the package index) serves a notebook on a free loopback port behind a token; its kernel is
this interpreter with this checkout's broadprop. The notebook is makemore's exercise with a
slip; Chromium runs every cell and sees the widget (an anywidget: the program page's own
modules) draw its check table and a heatmap. Nothing leaves the machine: every request that is
not to the loopback server is refused and recorded, and there must be none.

Screenshots: docs/screenshots/notebook-jupyterlab-widget.png (the widget, the README's) and
notebook-jupyterlab.png (the whole page); notebook-jupyterlab-failed.png where it fails."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from app.programs.presets import preset
from app.programs.schemas import ProgramRequest
from tests.notebook.kernel import ROOT
from tests.notebook.test_presets import forward_cell, setup_cell

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip
# the README's pictures are retaken with BROADPROP_SCREENSHOTS=1; a plain run keeps its
# screenshots apart (a test run must not rewrite tracked files)
SHOTS = (
    ROOT / "docs" / "screenshots"
    if os.environ.get("BROADPROP_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / "broadprop-screenshots"
)
KERNEL = "broadprop-test"


def _jupyter_lab() -> str | None:
    """The dev extra's jupyter-lab beside this interpreter, or BROADPROP_JUPYTER_LAB's."""
    return os.environ.get("BROADPROP_JUPYTER_LAB") or shutil.which(
        "jupyter-lab", path=str(Path(sys.executable).parent)
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook(folder: Path) -> Path:
    """makemore's exercise: its setup and forward, the backward with tanh's slip."""
    req = ProgramRequest(**preset("makemore")["request"])
    backward = req.backward.replace("(1.0 - h ** 2)", "(1.0 - hpreact ** 2)")
    assert backward != req.backward
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(c)
            for c in (setup_cell(req), forward_cell(req), "%%backward\n" + backward)
        ],  # fmt: skip
        metadata={
            "kernelspec": {"name": KERNEL, "display_name": "Broadprop (test)", "language": "python"}
        },  # fmt: skip
    )
    path = folder / "makemore.ipynb"
    nbformat.write(nb, path)
    return path


def _kernelspec(folder: Path) -> None:
    """This interpreter as the notebook's kernel, importing this checkout's broadprop."""
    spec = folder / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Broadprop (test)",
        "language": "python",
        "env": {"PYTHONPATH": str(ROOT)},
    }))  # fmt: skip


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    binary = _jupyter_lab()
    if binary is None:
        pytest.skip("jupyter-lab is not installed: pip install -e .[dev]")
    pytest.importorskip("playwright")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing")
    home = tmp_path_factory.mktemp("lab")
    _kernelspec(home / "share")
    # no announcements: JupyterLab's news would ask to fetch jupyter.org's feed
    labconfig = home / "config" / "labconfig"
    labconfig.mkdir(parents=True)
    (labconfig / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}
    ))  # fmt: skip
    _notebook(home)
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_PATH": str(home / "share"), "JUPYTER_CONFIG_DIR":
           str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "JUPYTER_DATA_DIR": str(home / "data"), "PYTHONPATH": str(ROOT)}  # fmt: skip
    log = (home / "lab.log").open("w")
    server = subprocess.Popen(
        [binary, "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={home}", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly", "--allow-root"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=home,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("JupyterLab did not start:\n" + (home / "lab.log").read_text())
                time.sleep(0.5)
        yield base, token, home
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_jupyterlab_draws_the_check_table_and_a_heatmap_with_nothing_fetched(lab):
    """In a thread of its own: Playwright's sync API refuses a thread with a running asyncio
    loop, which an earlier nbclient test in the same pytest worker may have left."""
    failures: list[BaseException] = []

    def drive() -> None:
        try:
            _drive(lab)
        except BaseException as e:  # re-raised in the test's own thread
            failures.append(e)

    thread = threading.Thread(target=drive, name="jupyterlab-browser")
    thread.start()
    thread.join()
    if failures:
        raise failures[0]


def _drive(lab):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    base, token, home = lab
    outside: list[str] = []
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 1000})

            def gate(route):  # the loopback server only; anything else is recorded, refused
                if route.request.url.startswith(base) or route.request.url.startswith(
                    ("data:", "blob:")
                ):
                    return route.continue_()
                outside.append(route.request.url)
                return route.abort()

            context.route("**/*", gate)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{base}/lab/tree/makemore.ipynb?token={token}", timeout=120_000)
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=120_000)
            # JupyterLab 4 asks which kernel to start; the notebook names ours
            select = page.locator(".jp-Dialog").get_by_role("button", name="Select")
            try:
                select.wait_for(timeout=20_000)
                select.click()
            except PlaywrightTimeout:
                pass
            page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(
                timeout=120_000
            )
            try:
                _run_and_look(page)
            except Exception:
                page.screenshot(path=str(SHOTS / "notebook-jupyterlab-failed.png"))
                raise AssertionError(f"page errors: {errors}; outside: {outside}") from None
            assert not errors, errors
        finally:
            browser.close()
    assert outside == [], f"fetched from outside the machine: {outside}"


def _run_and_look(page) -> None:
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    widget = page.locator(".jp-OutputArea .broadprop")
    widget.locator("table.checks tbody tr").first.wait_for(timeout=90_000)
    rows = widget.locator("table.checks tbody tr[data-name]")
    assert rows.count() == 26
    verdict = widget.locator(".verdict-line").inner_text()
    assert "First wrong gradient: dhpreact" in verdict
    # the heatmap: Plotly, asked of the kernel, draws the first failure's maps
    page.locator(".jp-OutputArea .broadprop[data-maps='hpreact']").wait_for(timeout=120_000)
    assert widget.locator(".maps .map .main-svg").count() >= 3
    assert "1 - h**2" in widget.inner_text()
    widget.scroll_into_view_if_needed()
    widget.screenshot(path=str(SHOTS / "notebook-jupyterlab-widget.png"))
    page.screenshot(path=str(SHOTS / "notebook-jupyterlab.png"))
