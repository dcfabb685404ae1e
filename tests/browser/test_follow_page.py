"""Follow one element on the page (static/js/follow.js): a click on a heatmap cell opens a panel
with the element, its formula with the index filled in, each term's factors by index, and the
sum arriving at the value; the diagram rings the slice; the URL keeps it and a reload restores
it. Real Chromium against a live server."""

import re

import pytest

from tests.browser.test_page import assert_clean

SMALL = "?batch=8&in_features=6&hidden=4,3&seed=3"


def wait_followed(page) -> None:
    page.wait_for_function(
        "() => document.querySelector('#follow-panel').dataset.state === 'ready'"
        " && document.querySelector('#follow-chart')?.dataset.drawn === '1'",
        timeout=60_000,
    )


def click_cell(page, name: str, row: int, col: int) -> None:
    """Click the centre of heatmap cell (row, col) of `name`'s chart (cells in index units)."""
    chart = page.locator(f'.heatmap-card[data-name="{name}"] .chart')
    chart.scroll_into_view_if_needed()
    x, y = page.evaluate(
        """([name, row, col]) => {
            const gd = document.getElementById(`heatmap-${name}`);
            const L = gd._fullLayout, hm = gd.data[0];
            const cx = (hm.x[col] + hm.x[col + 1]) / 2, cy = (hm.y[row] + hm.y[row + 1]) / 2;
            return [L._size.l + L.xaxis.d2p(cx), L._size.t + L.yaxis.d2p(cy)];
        }""",
        [name, row, col],
    )
    chart.click(position={"x": x, "y": y})


def panel(page) -> dict:
    return page.evaluate(
        """() => { const p = document.querySelector('#follow-panel');
            return { ...p.dataset, hidden: p.hidden, text: p.innerText,
                     listed: [...p.querySelectorAll('.follow-terms li:not(.more)')].map(li => li.innerText),
                     bars: document.getElementById('follow-chart').data.filter(t => t.type === 'bar')
                                    .map(t => t.x.length) }; }"""
    )


def assert_sum_is_value(p: dict, terms: int) -> None:
    assert int(p["terms"]) == terms
    total, value = float(p["sum"]), float(p["value"])
    # float32: the value is another float32 sum of the same products, within terms * eps * sum|p|
    assert abs(total - value) <= terms * 2**-23 * float(p["absSum"]), (total, value)


@pytest.mark.browser
def test_click_a_cell_shows_its_50_terms_and_the_url_keeps_it(watched):
    w = watched
    w.open(SMALL)
    page = w.page
    click_cell(page, "x", 2, 3)  # not downsampled: exactly x.g[2, 3]
    wait_followed(page)
    p = panel(page)
    assert p["grad"] == "x.g" and p["index"] == "2,3"
    assert_sum_is_value(p, 4)  # hidden [4, 3]: l1 has 4 units
    assert "x.g[2, 3] = (l1.g[2, :] * w1[3, :]).sum()" in p["text"]
    assert [t.split(" =")[0] for t in p["listed"]] == [
        f"l1.g[2, {k}] × w1[3, {k}]" for k in range(4)
    ]
    assert p["bars"] == [4, 4, 4]  # l1.g, w1, products
    assert "follow=x.g:2,3" in page.url
    assert page.get_attribute("#diagram", "data-follow-slice") == "[2, 3, :]"
    assert "sums the slice [2, 3, :] of (8, 6, 4)" in page.inner_text("#diagram-follow")
    # a reload restores it, with no click
    page.reload()
    w.wait_drawn()
    wait_followed(page)
    again = panel(page)
    assert again["index"] == "2,3" and again["sum"] == p["sum"] and again["value"] == p["value"]
    # closing it takes it out of the URL
    page.click(".follow-close")
    assert page.locator("#follow-panel").is_hidden()
    assert "follow=" not in page.url
    assert_clean(w)


@pytest.mark.browser
def test_article_x_g_cell_follows_its_block_extreme_with_50_terms(watched):
    w = watched
    w.open()
    page = w.page
    click_cell(page, "x", 10, 20)  # a downsampled cell: its block's largest |x.g|
    wait_followed(page)
    p = panel(page)
    assert p["grad"] == "x.g"
    i, j = map(int, p["index"].split(","))
    assert_sum_is_value(p, 50)
    assert p["listed"][0].startswith(f"l1.g[{i}, 0] × w1[{j}, 0] = ")
    assert re.search(rf"x\.g\[{i}, {j}\] = \(l1\.g\[{i}, :\] \* w1\[{j}, :\]\)\.sum\(\)", p["text"])
    assert "of the broadcast product (1000, 784, 50): 50 of its 39,200,000 products" in p["text"]
    assert "block" in p["text"]  # it says the element is the block's extreme
    assert f"follow=x.g:{i},{j}" in page.url
    # w1.g: the 1000 products over the batch
    click_cell(page, "w1", 0, 0)
    page.wait_for_function(
        "() => document.querySelector('#follow-panel').dataset.grad === 'w1.g'"
        " && document.querySelector('#follow-panel').dataset.state === 'ready'",
        timeout=60_000,
    )
    wait_followed(page)
    p = panel(page)
    assert_sum_is_value(p, 1000)
    assert p["bars"] == [1000, 1000, 1000]
    assert p["listed"][0].startswith("x[0, ")
    assert_clean(w)


@pytest.mark.browser
def test_follow_panel_is_projector_size_in_presentation_mode(watched):
    w = watched
    w.open(f"{SMALL}&present=1&follow=b1.g:2")
    page = w.page
    page.click('.present-tabs button[data-tab="gradients"]')
    wait_followed(page)
    p = panel(page)
    assert p["grad"] == "b1.g" and p["index"] == "2"
    assert_sum_is_value(p, 8)
    sizes = page.evaluate(
        """() => [...document.querySelectorAll('#follow-panel p, #follow-panel li, #follow-panel h3')]
            .map(e => parseFloat(getComputedStyle(e).fontSize))"""
    )
    assert sizes and min(sizes) >= 18, sizes
    chart_fonts = page.evaluate(
        "() => document.getElementById('follow-chart')._fullLayout.font.size"
    )
    assert chart_fonts >= 18
    assert_clean(w)


@pytest.mark.browser
def test_a_config_without_the_element_says_so_and_drops_it(watched):
    w = watched
    w.open(f"{SMALL}&follow=x.g:7,5")
    page = w.page
    wait_followed(page)
    assert panel(page)["index"] == "7,5"
    page.fill("#f-batch", "4")  # x.g is now (4, 6): row 7 is gone
    page.press("#f-batch", "Enter")
    page.wait_for_function(
        "() => document.querySelector('#follow-panel').dataset.state === 'error'", timeout=60_000
    )
    text = page.inner_text("#follow-panel")
    assert "out of range" in text and "0 to 3" in text
    page.wait_for_function("() => !location.search.includes('follow=')", timeout=10_000)
    assert page.locator("#diagram-follow").is_hidden()
    assert_clean(w, allowed=[r"status of 422"])


def follow_state(page) -> dict:
    """Where the panel sits once filled, which cell each chart marks, and the keyboard readout."""
    return page.evaluate(
        """() => { const p = document.querySelector('#follow-panel').getBoundingClientRect();
            const marks = Object.fromEntries([...document.querySelectorAll('.heatmap-card .chart')]
                .filter(c => c.dataset.mark).map(c => [c.dataset.name, c.dataset.mark]));
            return { top: p.top, viewport: innerHeight, marks }; }"""
    )


def shapes(page, name: str) -> list[dict]:
    return page.evaluate(
        "(name) => (document.getElementById(`heatmap-${name}`).layout.shapes || [])"
        ".map(s => ({x0: s.x0, x1: s.x1, y0: s.y0, y1: s.y1, dash: s.line.dash || null}))",
        name,
    )


@pytest.mark.browser
def test_issue_35_6_a_click_marks_its_cell_and_the_filled_panel_comes_into_view(watched):
    """35.6: the panel's top used to sit at the viewport's bottom edge (scrolled while still
    empty), and nothing said which cell had been clicked."""
    w = watched
    w.open()
    page = w.page
    page.evaluate("window.scrollTo(0, 0)")
    click_cell(page, "x", 10, 20)  # the article's x.g (1000, 784): a downsampled cell
    wait_followed(page)
    page.wait_for_timeout(200)
    s = follow_state(page)
    assert 60 <= s["top"] <= s["viewport"] * 0.6, s  # its top in view, below the sticky header
    assert s["marks"] == {"x": "10,20"}, s  # the clicked block, not another
    # the block's edges, in index units: rows r0..r1-1, cols c0..c1-1
    ys, xs = page.evaluate(
        "() => { const d = document.getElementById('heatmap-x').data[0];"
        " return [[d.y[10], d.y[11]], [d.x[20], d.x[21]]]; }"
    )
    (r0, r1), (c0, c1) = [[int(v + 0.5) for v in e] for e in (ys, xs)]
    assert r1 - r0 > 1 and c1 - c0 > 1, (ys, xs)
    p = panel(page)
    assert "null" not in p["text"]  # a note left out is nothing, not the word "null"
    i, j = map(int, p["index"].split(","))
    assert r0 <= i < r1 and c0 <= j < c1  # the followed element lies in that block
    (ring,) = shapes(page, "x")  # one solid ring, on the block's edges
    assert (ring["x0"], ring["x1"], ring["y0"], ring["y1"]) == (xs[0], xs[1], ys[0], ys[1])
    # the tooltip names the block's ranges, not its centre (its largest value sits elsewhere)
    text = page.evaluate("() => document.getElementById('heatmap-x').data[0].text[10][20]")
    assert text == f"rows {r0}–{r1 - 1}, cols {c0}–{c1 - 1}"
    template = page.evaluate("() => document.getElementById('heatmap-x').data[0].hovertemplate")
    assert "%{text} (largest |·| in the block)" in template and "%{x" not in template
    # closing the panel takes the ring away
    page.click(".follow-close")
    page.wait_for_function("() => !document.querySelector('.heatmap-card .chart[data-mark]')")
    assert shapes(page, "x") == []
    assert_clean(w)


@pytest.mark.browser
def test_issue_35_5_heatmap_cells_are_reachable_by_keyboard(watched):
    """35.5: follow needed a mouse. Tab reaches a map, arrows move a cursor, Enter follows."""
    w = watched
    w.open(SMALL)
    page = w.page
    label = page.get_attribute("#heatmap-x", "aria-label")
    assert "arrow keys" in label and "Enter" in label
    # Tab from the control just before the maps lands on a chart
    page.locator('input[name="grad-cells"][value="mean"]').focus()
    for _ in range(20):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.classList.contains('heatmap')"):
            break
    first = page.evaluate("() => document.activeElement.dataset.name")
    assert first, "Tab never reached a heatmap"
    page.locator("#heatmap-x").focus()
    readout = page.locator('.heatmap-card[data-name="x"] .cell-readout')
    assert readout.is_visible() and readout.inner_text().startswith("row 0, col 0: ")
    for key in ("ArrowDown", "ArrowDown", "ArrowRight", "ArrowRight", "ArrowRight"):
        page.keyboard.press(key)
    assert readout.inner_text().startswith("row 2, col 3: ")
    assert [s["dash"] for s in shapes(page, "x")] == ["dot"]  # the cursor, dashed
    url_before = page.url
    page.keyboard.press("Enter")
    wait_followed(page)
    p = panel(page)
    assert p["grad"] == "x.g" and p["index"] == "2,3"
    assert "follow=x.g:2,3" in page.url and page.url != url_before
    page.wait_for_function("() => document.getElementById('heatmap-x').dataset.mark === '2,3'")
    # ring and cursor on the same cell, and the arrow keys did not move the step-through
    assert sorted(str(s["dash"]) for s in shapes(page, "x")) == ["None", "dot"]
    assert_clean(w)
