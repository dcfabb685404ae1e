"""Run a notebook in a real kernel, headless (nbclient), as a check outside the project would:
the kernel imports this checkout's broadprop, whichever checkout the venv installed."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
MIME = "application/vnd.broadprop.check+json"
WIDGET = "application/vnd.jupyter.widget-view+json"


def notebook(*cells: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])


def execute(nb: nbformat.NotebookNode, timeout: int = 120) -> nbformat.NotebookNode:
    """Run every cell in one fresh python3 kernel; a cell that raises fails the run."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [before])])
    try:
        NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
        ).execute()
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before
    return nb


def displays(cell: nbformat.NotebookNode) -> list[dict]:
    """The display bundles a cell showed, in order."""
    return [o["data"] for o in cell.outputs if o["output_type"] == "display_data"]


def errors(cell: nbformat.NotebookNode) -> list[dict]:
    return [o for o in cell.outputs if o["output_type"] == "error"]


def printed(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o["output_type"] == "stream")
