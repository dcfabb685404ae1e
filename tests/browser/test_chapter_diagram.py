"""The shape-flow diagram draws the chapters' 4-D shapes readably (issue 30, item 5): the
causal mask's (T, T) broadcast over (B, nh) with its alignment, the heads split as a view and
a transpose, and unfold's (N, C·kh·kw, L) layout explained in a tooltip.

A screenshot of the GPT's diagram lands in BROADPROP_SCREENSHOTS (a folder) when it is set."""

import os
from pathlib import Path

import pytest

from tests.browser.test_program_page import open_program, verdict

SHOTS = os.environ.get("BROADPROP_SCREENSHOTS")

NOTES = """() => [...document.querySelectorAll('#flow svg text.note')].map((t) => ({
  kind: t.dataset.kind, text: t.firstChild.textContent,
  title: t.querySelector('title')?.textContent || ''}))"""


@pytest.mark.browser
def test_the_gpt_diagram_shows_the_mask_broadcast_and_the_head_split(watched):
    w = watched
    open_program(w, "?preset=gpt")
    page = w.page
    assert verdict(w) == "all-match"
    notes = page.evaluate(NOTES)
    # the mask (T, T) = (8, 8) right-aligned as (1, 1, 8, 8), stretched over B and nh
    mask = [n for n in notes if n["kind"] == "bcast" and n["text"].startswith("broadcast (8, 8)")]
    assert mask, notes
    assert "as (1, 1, 8, 8) over B, nh → (32, 4, 8, 8)" in mask[0]["text"]
    assert "masked_fill" in mask[0]["title"] and "sums over B, nh" in mask[0]["title"]
    edge = page.locator('#flow path.edge[data-from="mask"][data-to="att"]')
    assert "bcast" in edge.get_attribute("class")
    # the heads: (B, T, C) viewed as (B, T, nh, hs), then transpose(1, 2) to (B, nh, T, hs),
    # once per q, k and v
    views = [n["text"] for n in notes if n["kind"] == "view"]
    assert "view (32, 8, 32) → (32, 8, 4, 8) (split) ×3" in views, views
    assert "transpose(1, 2) (32, 8, 4, 8) → (32, 4, 8, 8) ×3" in views, views
    # a 4-D name's box names its dims as the line's shape comment does
    title = page.locator('#flow g.node[data-name="att"] > title').text_content()
    assert "(32, 4, 8, 8)" in title and "(B, nh, T, T)" in title
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / "program-gpt-diagram.png"), full_page=True)
    assert w.errors == []


@pytest.mark.browser
def test_the_conv_diagram_explains_unfold_s_layout(watched):
    w = watched
    open_program(w, "?preset=conv")
    notes = w.page.evaluate(NOTES)
    layout = [n for n in notes if n["kind"] == "layout"]
    assert layout and "(N, C·kh·kw, L) = (16, 9, 784)" in layout[0]["text"], notes
    tip = layout[0]["title"]
    assert "N = 16 images" in tip and "L = 784" in tip and "C·kh·kw = 9" in tip
    assert w.errors == []
