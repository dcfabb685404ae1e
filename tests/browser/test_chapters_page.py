"""The new chapters on the page (issue 31): /program?preset=gpt, conv and rnn check all-close,
draw their 4-D shapes with no console error, fill the training form with the preset's
defaults, and train: the conv net shows its val accuracy, the RNN its sampled names.

Screenshots of each page land in BROADPROP_SCREENSHOTS (a folder) when it is set."""

import os
from pathlib import Path

import pytest

from app.programs import presets
from tests.browser.test_program_page import open_program, verdict

SHOTS = os.environ.get("BROADPROP_SCREENSHOTS")


def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


@pytest.mark.browser
@pytest.mark.parametrize(
    "preset_id, shapes",
    [
        ("gpt", ["(32, 4, 8, 8)", "(32, 8, 27)"]),
        ("conv", ["(16, 1, 28, 28)", "(16, 8, 28, 28)", "(16, 8, 14, 14)"]),
        ("rnn", ["(32, 8, 64)", "(32, 8, 27)"]),
    ],
)
def test_each_chapter_page_checks_all_close_and_draws_its_shapes(watched, preset_id, shapes):
    w = watched
    open_program(w, f"?preset={preset_id}")
    page = w.page
    assert verdict(w) == "all-match"
    entry = presets.preset(preset_id)
    rows = page.locator("#checks tbody tr[data-name]").count()
    assert rows == len(page.evaluate("() => [...document.querySelectorAll('#checks tbody tr')]"))
    assert rows >= (25 if preset_id == "gpt" else 6)
    flow = page.inner_text("#flow")
    for s in shapes:
        assert s in flow, s
    for name in ("steps", "batch", "lr"):
        assert float(page.input_value(f"#pt-{name}")) == entry["train"][name]
    if preset_id == "gpt":  # the wide flow takes the page's width, every name on screen
        assert page.get_attribute("body", "data-flow") == "stacked"
        box = page.eval_on_selector("#flow", "el => [el.scrollWidth, el.clientWidth]")
        assert box[0] <= box[1] + 4
    shot(page, f"program-{preset_id}")
    assert w.errors == []


@pytest.mark.browser
def test_a_conv_training_shows_val_accuracy_and_an_rnn_samples_names(watched):
    w = watched
    open_program(w, "?preset=conv")
    page = w.page
    page.fill("#pt-steps", "30")
    page.click("#train-start")
    page.wait_for_function("() => document.getElementById('train-panel').dataset.state === 'done'",
                           timeout=120_000)  # fmt: skip
    accuracy = float(page.get_attribute("#train-panel", "data-accuracy"))
    assert 0.5 < accuracy <= 1 and "val accuracy" in page.inner_text("#train-status")
    assert page.is_visible("#accuracy-box") and not page.is_visible("#samples-box")
    shot(page, "program-conv-trained")
    open_program(w, "?preset=rnn")
    page.fill("#pt-steps", "40")
    page.click("#train-start")
    page.wait_for_function("() => document.getElementById('train-panel').dataset.state === 'done'",
                           timeout=120_000)  # fmt: skip
    assert page.locator("#samples li").count() == 20
    shot(page, "program-rnn-trained")
    assert w.errors == []


@pytest.mark.browser
def test_clicking_the_gpt_attention_weight_map_follows_an_entry(watched):
    w = watched
    open_program(w, "?preset=gpt")
    page = w.page
    page.click('#checks tbody tr[data-name="Wq"]')
    page.wait_for_function("() => document.body.dataset.maps === 'Wq'")
    # a click on cell (row 3, col 5) of the manual map: Plotly's own click event
    page.evaluate("""() => {
        const el = document.getElementById('map-manual');
        el.emit('plotly_click', {points: [{x: 5, y: 3}]});
    }""")
    page.wait_for_function("() => document.getElementById('follow-box').dataset.terms")
    box = page.inner_text("#follow-box")
    assert "dWq[3, 5]" in box and "dWq = xn.view(B * T, C).T @ dq2" in box
    assert page.get_attribute("#follow-box", "data-terms") == "256"
    assert page.locator("#follow-box tbody tr").count() == 12
    shot(page, "program-gpt-follow")
    assert w.errors == []
