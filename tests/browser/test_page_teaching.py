"""The page as a teacher and a student use it (issue 11): phone and projector layouts,
presentation mode, a small run's numbers, the maths beside the code, links to a step, and one
regression test per defect the issue lists that a browser can see."""

import json
import re

import pytest
from test_page import SMALL, assert_clean

SHOWCASE = "?batch=2&in_features=3&hidden=4"
pytestmark = pytest.mark.browser


def open_at(browser, server, query, width, height, scale=1):
    """A page at a viewport (`scale`: device pixels per CSS pixel, as zoom sets it)."""
    from conftest import Watched

    context = browser.new_context(
        viewport={"width": width, "height": height}, device_scale_factor=scale
    )
    context.route(lambda url: not url.startswith(server + "/"), lambda route: route.abort())
    context.set_default_timeout(60_000)
    w = Watched(context.new_page(), server)
    w.open(query)
    return context, w


def overflow(page) -> int:
    return page.evaluate("document.documentElement.scrollWidth - innerWidth")


@pytest.mark.parametrize(
    "size",
    [(390, 844), (1024, 768), (853, 533)],  # phone; small laptop; 1280x800 at 150% zoom
    ids=["phone", "1024", "1280-at-150%"],
)
def test_no_horizontal_overflow_and_a_small_header(browser, server, size):
    context, w = open_at(browser, server, "", *size)
    page = w.page
    assert overflow(page) <= 0, overflow(page)
    header = page.evaluate(
        "(() => { const t = document.querySelector('.top');"
        " return [t.offsetHeight, getComputedStyle(t).position]; })()"
    )
    if size != (1024, 768):
        assert header[1] != "sticky"  # it scrolls away on small screens
    if size == (390, 844):
        assert header[0] <= 0.12 * 844, header
    # the diagram starts within the first screen (the form is a drawer there)
    top = page.evaluate("document.querySelector('#diagram').getBoundingClientRect().top")
    assert top < size[1], top
    if page.is_visible("#config-toggle"):
        page.click("#config-toggle")
    assert page.is_visible("#f-batch")
    assert overflow(page) <= 0
    assert_clean(w)
    context.close()


def test_multi_statement_forward_code_keeps_its_lines(watched):
    w = watched
    w.open("?batch=8&in_features=6&hidden=4&norm=layernorm")
    code = w.page.locator("#code-lines li.fwd code").nth(1)
    assert "\n" in code.inner_text()
    lines = w.page.evaluate(
        "(() => { const c = document.querySelectorAll('#code-lines li.fwd code')[1];"
        " return c.offsetHeight / parseFloat(getComputedStyle(c).lineHeight || 16); })()"
    )
    assert lines >= 2, lines
    assert_clean(w)


def test_difference_view_is_scaled_by_the_tolerance_and_in_the_url(watched):
    w = watched
    w.open("?batch=16&in_features=8&hidden=6&norm=batchnorm")
    page = w.page
    page.check('input[name="grad-view"][value="difference"]')
    page.wait_for_url(re.compile(r"view=difference"))
    w.wait_drawn()  # (the run again, with autograd's maps: the manual view's went without)
    for name in ("x", "gamma1", "b1"):
        chart = page.evaluate(
            f"""() => {{ const c = document.querySelector('#heatmap-{name}');
                return {{zmin: c.data[0].zmin, zmax: c.data[0].zmax, z: c.data[0].z,
                         caption: c.closest('figure').textContent}}; }}"""
        )
        # one fixed scale for every chart, in tolerance units: rounding noise stays pale
        assert chart["zmin"] == 0 and chart["zmax"] >= 3
        assert all(abs(v) <= 1 for row in chart["z"] for v in row if v is not None)
        assert "max |manual − autograd|" in chart["caption"]
    page.reload()
    w.wait_drawn()
    assert page.is_checked('input[name="grad-view"][value="difference"]')
    assert_clean(w)


def test_budget_error_shows_under_the_field_that_was_changed(watched):
    w = watched
    w.open()
    page = w.page
    page.fill("#f-hidden", "4096,4096")
    page.press("#f-hidden", "Tab")
    page.wait_for_function("() => document.querySelector('#err-hidden').textContent !== ''")
    assert "memory budget" in page.inner_text("#err-hidden")
    assert_clean(w, allowed=[r"status of 422"])


@pytest.mark.fresh_page  # a request handler of its own
def test_seed_beyond_2_to_the_53_is_sent_exactly(watched):
    w = watched
    w.open(SMALL)
    page = w.page
    seed = "9007199254740993"  # 2^53 + 1: a JS number would round it
    bodies = []
    page.on("request", lambda r: r.url.endswith("/api/run") and bodies.append(r.post_data))
    page.fill("#f-seed", seed)
    page.press("#f-seed", "Tab")
    page.wait_for_url(re.compile(f"seed={seed}"))
    w.wait_drawn()
    assert f'"seed":{seed}' in bodies[-1]  # a JSON number, exact
    assert page.inner_text("#err-seed") == ""
    assert page.input_value("#f-seed") == seed
    assert_clean(w)


def test_diagram_tooltips_legend_colours_and_op_nodes(watched):
    w = watched
    w.open(SMALL)
    page = w.page
    page.hover('#diagram .step-node[data-step="0"]')
    tip = page.locator("#diagram-tip")
    assert tip.is_visible()
    assert tip.locator("code").count() >= 1 and "<code>" not in tip.inner_text()
    legend = page.locator("#diagram-legend .key")
    labels = [legend.nth(i).inner_text().strip() for i in range(legend.count())]
    assert len(labels) == len(set(labels)), labels  # no kind listed twice
    # every step's fill is its legend key's colour; reduce steps are purple, as their badge
    keys = page.evaluate(
        """() => { const out = {};
            for (const k of document.querySelectorAll('#diagram-legend .key')) {
              const m = k.querySelector('svg > *'); if (m) out[k.textContent.trim()] = m.getAttribute('fill'); }
            return out; }"""
    )
    fills = page.evaluate(
        """() => [...document.querySelectorAll('#diagram .step-node')].map(
             g => [g.dataset.action, g.firstElementChild.getAttribute('fill')])"""
    )
    reduce_fill = keys["reduce (sum)"]
    assert all(f == reduce_fill for a, f in fills if a == "reduce")
    page.click('#diagram .step-node[data-action="reduce"]')
    badge = page.evaluate(
        "getComputedStyle(document.querySelector('#step-detail .badge')).backgroundColor"
    )
    assert badge == "rgb(112, 72, 232)" and reduce_fill.lower() == "#7048e8"
    ops = page.locator("#diagram .op-node")
    assert ops.count() == 6  # three linear layers, two relus and the loss
    text = page.inner_text("#diagram")
    assert "@ +" in text and "relu" in text and "mse" in text
    # columns are numbered in the order they run: the first one is the loss's out.g
    assert re.search(r"\b1 out\.g", text)
    assert_clean(w)


def test_deep_net_scrolls_to_where_backward_starts(watched):
    w = watched
    w.open("?batch=8&in_features=6&hidden=64,64,64,64")
    page = w.page
    state = page.evaluate(
        """() => { const s = document.querySelector('.diagram-scroll');
            return [s.scrollWidth > s.clientWidth, s.scrollLeft, s.classList.contains('overflowing')]; }"""
    )
    assert state[0] and state[1] > 0 and state[2], state
    assert page.is_visible(".scroll-cue")
    assert_clean(w)


def test_step_is_in_the_url_and_survives_a_rerun_and_a_reload(watched):
    w = watched
    w.open(SMALL)
    page = w.page
    page.click('#code-lines li.bwd button:has-text("w2.g =")')
    page.click("#step-next")
    page.wait_for_url(re.compile(r"step=w2:2"))
    pos = page.inner_text("#step-pos")
    step = re.search(r"step=([^&]+)", page.url)[1]
    page.fill("#f-seed", "11")
    page.press("#f-seed", "Tab")
    page.wait_for_url(re.compile(r"seed=11"))
    w.wait_drawn()
    assert page.inner_text("#step-pos") == pos  # a re-run keeps the step
    assert f"step={step}" in page.url
    page.reload()
    w.wait_drawn()
    assert page.inner_text("#step-pos") == pos
    assert_clean(w)


def test_downsampled_maps_keep_the_extremes_and_one_cell_draws(watched):
    w = watched
    w.open("?batch=64&in_features=40&hidden=30&out_features=5&loss=cross_entropy&max_cells=64")
    page = w.page
    x = page.evaluate(
        """() => { const c = document.querySelector('#heatmap-x');
            return {zmax: c.data[0].zmax, z: c.data[0].z.flat(), kind: c.dataset.kind}; }"""
    )
    assert x["kind"] == "extreme"
    assert max(abs(v) for v in x["z"]) == pytest.approx(x["zmax"], rel=1e-6)
    caption = page.inner_text('.heatmap-card[data-name="x"]')
    assert "largest magnitude" in caption
    w.open("?max_cells=1")
    for name in ("x", "w1"):
        one = page.evaluate(
            f"""() => {{ const c = document.querySelector('#heatmap-{name}');
                const img = c.querySelector('.hm image, .heatmaplayer image');
                return {{z: c.data[0].z, x: c.data[0].x, drawn: !!img}}; }}"""
        )
        assert len(one["z"]) == 1 and len(one["z"][0]) == 1 and one["z"][0][0] != 0
        assert len(one["x"]) == 2  # one cell's two edges: it spans the whole tensor
        assert one["drawn"]
    assert_clean(w)


def test_alignment_names_its_operands_and_the_reduction_that_follows(watched):
    w = watched
    w.open()
    page = w.page
    table = page.locator("#step-detail table.align")
    heads = table.locator("tbody th").all_inner_texts()
    assert heads[0].startswith("l1.g.unsqueeze(1)") and heads[1].startswith("w1"), heads
    assert any(t.startswith("then .sum(-1)") for t in heads), heads
    assert not any(t.endswith(".g sums") for t in heads)
    # the explainer takes the shapes, and the keyboard goes with them
    page.click("#step-detail button.secondary")
    assert page.evaluate("document.activeElement.id") == "bx-a"
    assert_clean(w)


@pytest.mark.parametrize("strategy", ["matmul", "einsum"])
def test_other_strategies_show_the_code_that_ran(watched, strategy):
    w = watched
    w.open(f"?strategy={strategy}")
    page = w.page
    ran = page.inner_text("#code-ran")
    assert f"strategy {strategy}" in ran
    assert ("x.g = l1.g @ w1.T" if strategy == "matmul" else "torch.einsum(") in ran
    summary = page.inner_text("#summary")
    assert "largest broadcast intermediate" not in summary and strategy in summary
    assert "materialized no broadcast intermediate" in page.inner_text("#diagram-notes")
    assert_clean(w)


def test_maths_beside_the_code(watched):
    w = watched
    w.open()
    page = w.page
    maths = page.inner_text("#step-math")
    assert "x.g = l1.g @ w1.T" in maths and "Σ" in maths
    page.click('#code-lines li.bwd button:has-text("w1.g =")')
    assert "w1.g = x.T @ l1.g" in page.inner_text("#step-math")
    assert_clean(w)


def test_small_run_shows_the_numbers_and_the_stretch(watched):
    w = watched
    w.open(SHOWCASE)
    page = w.page
    detail = page.locator("#step-detail")
    assert detail.locator("table.nums").count() >= 4  # two operands, stretched, and the result
    assert detail.locator("table.nums td.stretched").count() > 0
    # the result's numbers are the operands' products, entry by entry
    page.keyboard.press("ArrowRight")  # the reduction that sums the stretched dim away
    assert "Σ over dim" in detail.inner_text()
    page.uncheck("#numbers-toggle")
    assert detail.locator("table.nums").count() == 0
    page.wait_for_url(re.compile(r"numbers=0"))
    assert_clean(w)


def test_presentation_mode(watched):
    w = watched
    w.open(SMALL + "&present=1")
    page = w.page
    assert page.evaluate("document.body.classList.contains('present')")
    assert page.evaluate("getComputedStyle(document.querySelector('.top')).position") == "static"
    assert not page.is_visible("#f-batch")  # the form is in a drawer
    visible = page.evaluate(
        "[...document.querySelectorAll('main [data-section]')].filter(s => s.offsetParent)"
        ".map(s => s.dataset.section)"
    )
    assert set(visible) == {"diagram"}
    code_px = page.evaluate(
        "parseFloat(getComputedStyle(document.querySelector('#code-lines code')).fontSize)"
    )
    assert code_px >= 18
    before = page.inner_text("#step-pos")
    page.keyboard.press("ArrowRight")
    assert page.inner_text("#step-pos") != before
    page.keyboard.press("PageDown")
    assert page.is_visible("#heatmaps") and not page.is_visible("#diagram")
    page.click("#config-toggle")
    assert page.is_visible("#f-batch")
    page.keyboard.press("Escape")
    page.click("#present-toggle")
    assert "present" not in page.url
    assert_clean(w)


def test_cross_entropy_explains_its_two_out_columns_and_checks_intermediates(watched):
    w = watched
    w.open("?batch=16&in_features=10&hidden=8&out_features=4&loss=cross_entropy")
    page = w.page
    assert "out.g has 2 columns" in page.inner_text("#diagram-notes")
    names = page.locator("#check-table tr.intermediate").evaluate_all(
        "rows => rows.map(r => r.dataset.name)"
    )
    assert {"out", "out:fused", "l1"} <= set(names)
    # numbers never break mid-token; small runs do not read "0 ms"
    assert (
        page.evaluate("getComputedStyle(document.querySelector('#check-table td.n')).whiteSpace")
        == "nowrap"
    )
    assert not re.search(r"(?<![\d.])0 ms", page.inner_text("#summary"))
    assert_clean(w)


def test_responses_are_gzipped_and_assets_versioned(watched):
    w = watched
    w.open()
    page = w.page
    got = page.evaluate(
        """async () => { const r = await fetch('/api/run', {method: 'POST',
              headers: {'content-type': 'application/json'}, body: '{}'});
            return [r.headers.get('content-encoding'), r.headers.get('server-timing')]; }"""
    )
    assert got[0] == "gzip" and got[1].startswith("app;dur=")
    css = page.evaluate("document.querySelector('link[rel=stylesheet]').href")
    assert re.search(r"page\.css\?v=\w+", css)
    cache = page.evaluate(f"fetch({json.dumps(css)}).then(r => r.headers.get('cache-control'))")
    assert "immutable" in cache
    assert_clean(w)
