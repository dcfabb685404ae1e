"""The page's "Download script" and "Download notebook" buttons, in a real browser: each
hands over the file POST /api/export makes for the run on screen."""

import json
from urllib.parse import quote

import nbformat
import pytest

SMALL = "?batch=8&in_features=6&hidden=4,3&seed=3"


@pytest.mark.browser
def test_download_script_and_notebook_of_the_run_on_screen(watched, tmp_path):
    w = watched
    w.open(SMALL)
    page = w.page
    button = page.locator("#export-py")
    assert button.is_enabled()
    with page.expect_download() as info:
        button.click()
    download = info.value
    assert download.suggested_filename == "broadprop_6-4-3-1_relu_mse_float32_seed3.py"
    script = tmp_path / download.suggested_filename
    download.save_as(script)
    text = script.read_text()
    assert "g = torch.Generator().manual_seed(3)" in text
    assert "x = torch.randn(8, 6, generator=g)" in text
    assert "x.g = (l1.g.unsqueeze(1) * w1).sum(-1)" in text
    assert '"reference_heatmaps"' not in text  # the page's view option is not the run's
    compile(text, script.name, "exec")

    with page.expect_download() as info:
        page.click("#export-ipynb")
    notebook = tmp_path / info.value.suggested_filename
    assert notebook.suffix == ".ipynb"
    info.value.save_as(notebook)
    nb = nbformat.reads(notebook.read_text(), as_version=4)
    nbformat.validate(nb)
    assert "manual_seed(3)" in json.dumps(nb.cells)
    assert page.inner_text("#export-status") == ""
    assert w.errors == [] and w.foreign() == []


@pytest.mark.browser
def test_an_exercise_downloads_only_once_written_and_without_the_answer(watched, tmp_path):
    w = watched
    w.open(SMALL + "&hide=x.g")
    page = w.page
    assert page.locator("#export-py").is_disabled()
    assert page.locator("#export-ipynb").is_disabled()
    assert "Write x.g" in page.inner_text("#export-status")

    w.open(SMALL + "&hide=x.g&f.x.g=" + quote("l1.g @ w1.T"))
    assert page.locator("#export-py").is_enabled()
    with page.expect_download() as info:
        page.click("#export-py")
    script = tmp_path / info.value.suggested_filename
    info.value.save_as(script)
    text = script.read_text()
    assert "x.g = l1.g @ w1.T" in text
    assert "(l1.g.unsqueeze(1) * w1).sum(-1)" not in text  # the hidden answer stays hidden
    assert "w1.g = (x.unsqueeze(-1) * l1.g.unsqueeze(1)).sum(0)" in text  # not hidden
    assert w.errors == [] and w.foreign() == []
