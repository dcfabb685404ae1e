"""The visualizer page in a real browser (Playwright driving Debian's Chromium) against a live
uvicorn server: it draws on load, follows its URL, re-runs on change, steps, shows errors in
place, and asks nothing of any other origin."""

import contextlib
import json
import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.server import assets

SMALL = "?batch=8&in_features=6&hidden=4,3&seed=3"
ARTICLE_GRADS = {"x", "w1", "b1", "w2", "b2"}


def diagram_text(page) -> str:
    return page.eval_on_selector("#diagram", "e => e.textContent")


def drawn_heatmaps(page) -> dict[str, str]:
    """name -> caption, for every heatmap card whose Plotly chart holds a heatmap trace."""
    return page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('.heatmap-card')]
            .filter(c => { const d = c.querySelector('.chart').data;
                           return d && d[0].type === 'heatmap' && d[0].zmid === 0; })
            .map(c => [c.dataset.name, c.querySelector('figcaption').textContent]))"""
    )


def assert_clean(w, allowed=()) -> None:
    errors = [e for e in w.errors if not any(re.search(a, e) for a in allowed)]
    assert errors == [], errors
    assert w.foreign() == [], w.foreign()


@pytest.mark.browser
def test_default_load_draws_the_article_run_with_no_click(watched):
    w = watched
    w.open()
    page = w.page
    text = diagram_text(page)
    for shp in ("(1000, 784)", "(1000, 1, 50)", "(1000, 784, 50)", "(784, 50)", "(50,)"):
        assert shp in text, shp
    assert "156.8 MB" in text  # the broadcast intermediate, annotated by its memory
    assert int(page.get_attribute("#diagram", "data-steps")) > 10
    maps = drawn_heatmaps(page)
    assert set(maps) >= ARTICLE_GRADS
    assert "(1000, 784)" in maps["x"]
    notice = page.locator('.heatmap-card[data-name="x"] .notice.downsampled')
    assert notice.is_visible() and "(1000, 784)" in notice.inner_text()
    rows = page.locator("#check-table tbody tr:not(.intermediate)")
    assert {rows.nth(i).get_attribute("data-name") for i in range(rows.count())} == set(maps)
    inter = page.locator("#check-table tbody tr.intermediate")
    assert {inter.nth(i).get_attribute("data-name") for i in range(inter.count())} >= {"out", "l1"}
    rows = page.locator("#check-table tbody tr")
    assert page.locator("#check-table .verdict.pass").count() == rows.count()
    # The selected step starts on the article's broadcast, with its aligned table.
    assert "(1000, 784, 50)" in page.inner_text("#step-detail")
    assert page.locator("#step-detail td.stretched").count() >= 2
    assert page.url.endswith("/")  # the default config keeps the URL bare
    assert_clean(w)


@pytest.mark.browser
def test_url_opens_that_run(watched):
    w = watched
    w.open(SMALL)
    page = w.page
    assert "(8, 6, 4)" in diagram_text(page)
    assert page.input_value("#f-batch") == "8"
    assert page.input_value("#f-hidden") == "4,3"
    assert page.input_value("#f-seed") == "3"
    assert set(drawn_heatmaps(page)) == {"x", "w1", "b1", "w2", "b2", "w3", "b3"}
    assert_clean(w)


@pytest.mark.browser
def test_changing_a_field_updates_url_and_charts_and_back_works(watched):
    w = watched
    w.open(SMALL)
    page = w.page
    page.fill("#f-hidden", "5")
    page.press("#f-hidden", "Tab")  # change event
    page.wait_for_url(re.compile(r"hidden=5(&|$)"))
    w.wait_drawn()
    page.wait_for_function(
        "() => document.querySelector('#diagram').textContent.includes('(8, 6, 5)')"
    )
    maps = drawn_heatmaps(page)
    assert set(maps) == {"x", "w1", "b1", "w2", "b2"}
    assert "(5, 1)" in maps["w2"]
    page.select_option("#f-activation", "tanh")
    page.wait_for_url(re.compile(r"activation=tanh"))
    w.wait_drawn()
    assert "tanh" in page.inner_text("#code-lines")
    page.go_back()  # popstate: the previous URL's run comes back
    page.wait_for_function("() => !location.search.includes('activation')")
    w.wait_drawn()
    assert page.input_value("#f-activation") == "relu"
    assert "tanh" not in page.inner_text("#code-lines")
    page.go_back()
    page.wait_for_function(
        "() => document.querySelector('#diagram').textContent.includes('(8, 6, 4)')"
    )
    assert page.input_value("#f-hidden") == "4,3"
    assert_clean(w)


@pytest.mark.browser
def test_heatmaps_switch_between_manual_autograd_and_difference(watched):
    w = watched
    w.open(SMALL)
    page = w.page

    def shown(name: str) -> dict:
        return page.evaluate(
            f"""() => {{ const c = document.querySelector('#heatmap-{name}');
                return {{view: c.dataset.view, z: c.data[0].z,
                         title: c.closest('figure').querySelector('figcaption').textContent}}; }}"""
        )

    manual = shown("w1")
    assert manual["view"] == "manual" and "manual" in manual["title"]
    page.check('input[name="grad-view"][value="autograd"]')
    w.wait_drawn()  # (the manual view's run had no autograd maps: the same run, with them)
    autograd = shown("w1")
    assert autograd["view"] == "autograd" and "autograd" in autograd["title"]
    flat = lambda z: [v for row in z for v in row]  # noqa: E731
    # the same gradient by two routes: equal up to float32 rounding, but really drawn again
    assert len(flat(autograd["z"])) == len(flat(manual["z"]))
    for m, a in zip(flat(manual["z"]), flat(autograd["z"])):
        assert abs(m - a) <= 1e-4 * (1 + abs(a))
    page.check('input[name="grad-view"][value="difference"]')
    diff = shown("w1")
    assert diff["view"] == "difference" and "−" in diff["title"] and "tolerance" in diff["title"]
    # drawn in units of the check's tolerance: rounding stays within +-1 (calm colours)
    assert max(abs(v) for v in flat(diff["z"])) <= 1
    # the caption states the difference, not the manual gradient's stats
    assert "max |manual − autograd|" in diff["title"] and "min " not in diff["title"]
    assert_clean(w)


@contextlib.contextmanager
def run_bodies(page) -> Iterator[list[dict]]:
    """The bodies of the runs the page asks for meanwhile (a followed element's left out)."""
    bodies: list[dict] = []

    def record(request) -> None:
        if request.url.endswith("/api/run") and '"follow"' not in (request.post_data or ""):
            bodies.append(json.loads(request.post_data))

    page.on("request", record)
    try:
        yield bodies
    finally:
        page.remove_listener("request", record)


def change_field(page, field: str, value: str) -> None:
    """A form field set and changed as a learner would (the change event, no blur after)."""
    page.evaluate(
        """([field, value]) => { const input = document.querySelector(`#f-${field}`);
            input.value = value; input.dispatchEvent(new Event('change', {bubbles: true})); }""",
        [field, value],
    )


def asked_maps(bodies: list[dict]) -> list[bool]:
    return [b["reference_heatmaps"] for b in bodies]


@pytest.mark.browser
def test_autograds_maps_are_asked_for_only_by_the_views_that_draw_them(watched):
    # the manual view's run goes without autograd's and the difference's maps (the default
    # run's answer 173 KB instead of 461 KB); a view that draws them asks the same run again
    w = watched
    page = w.page
    with run_bodies(page) as bodies:
        w.open(SMALL)
        assert asked_maps(bodies) == [False]
        view = "document.querySelector('#heatmap-w1').dataset.view"
        page.check('input[name="grad-view"][value="autograd"]')
        w.wait_drawn()
        assert asked_maps(bodies) == [False, True] and page.evaluate(view) == "autograd"
        page.check('input[name="grad-view"][value="difference"]')  # (already there)
        w.wait_drawn()
        assert asked_maps(bodies) == [False, True] and page.evaluate(view) == "difference"
        change_field(page, "seed", "4")
        w.wait_drawn()
        assert asked_maps(bodies) == [False, True, True] and page.evaluate(view) == "difference"
        page.check('input[name="grad-view"][value="manual"]')  # drawn from what is here
        w.wait_drawn()
        assert asked_maps(bodies) == [False, True, True] and page.evaluate(view) == "manual"
    assert_clean(w)


@pytest.mark.browser
def test_a_view_switched_while_a_run_is_in_flight_keeps_that_run(watched):
    # the autograd view chosen while a new config's run (asked without autograd's maps) is on
    # its way: that config is drawn, in the autograd view, never the config shown before it
    w = watched
    page = w.page
    w.open(SMALL)
    with run_bodies(page) as asked:
        page.evaluate(  # in one task: the view changes while the seed's run is on its way
            """() => { const seed = document.querySelector('#f-seed');
                seed.value = '9'; seed.dispatchEvent(new Event('change', {bubbles: true}));
                const view = document.querySelector('input[name="grad-view"][value="autograd"]');
                view.checked = true; view.dispatchEvent(new Event('change', {bubbles: true})); }"""
        )
        w.wait_drawn()
    assert [(r.get("seed"), r["reference_heatmaps"]) for r in asked] == [(9, False), (9, True)]
    assert page.evaluate("document.querySelector('#heatmap-w1').dataset.view") == "autograd"
    assert page.input_value("#f-seed") == "9" and "seed=9" in page.url
    assert_clean(w)


@pytest.mark.browser
def test_a_view_switch_after_a_refused_config_keeps_the_learners_input(watched):
    # the autograd view asked for after the server refused the learner's last config: the
    # maps come for the run on screen, and the refused input, its error and the stale note
    # stay where they are (the config on screen is not run again as if it were the last ask)
    w = watched
    page = w.page
    w.open(SMALL)
    change_field(page, "in_features", "0")
    w.wait_drawn()
    assert page.inner_text("#err-in_features")
    assert "stale" in page.get_attribute("#main", "class")
    page.check('input[name="grad-view"][value="autograd"]')
    w.wait_drawn()
    assert page.evaluate("document.querySelector('#heatmap-w1').dataset.view") == "autograd"
    assert page.input_value("#f-in_features") == "0" and page.inner_text("#err-in_features")
    assert "stale" in page.get_attribute("#main", "class") and "view=autograd" in page.url
    assert_clean(w, allowed=[r"status of 422"])  # (the browser logs the refused run)


@pytest.mark.browser
def test_stepping_moves_the_highlight(watched):
    w = watched
    w.open(SMALL)
    page = w.page

    def where():
        return (
            page.get_attribute("#diagram", "data-selected"),
            page.get_attribute("#diagram", "data-selected-xy"),
            page.inner_text("#step-pos"),
            page.inner_text("#code-lines li.current"),
        )

    start = where()
    page.click("#step-next")
    after = where()
    assert int(after[0]) == int(start[0]) + 1
    assert after[1] != start[1] and after[2] != start[2]
    # The ring is drawn on the selected step's marker.
    ring, node = page.evaluate(
        """() => { const box = (el) => { const r = el.getBoundingClientRect();
                     return [Math.round(r.x + r.width / 2), Math.round(r.y + r.height / 2)]; };
                   const d = document.querySelector('#diagram');
                   return [box(d.querySelector('.ring')),
                           box(d.querySelector(`.step-node[data-step="${d.dataset.selected}"]`))]; }"""
    )
    assert abs(ring[0] - node[0]) <= 1 and abs(ring[1] - node[1]) <= 1, (ring, node)
    page.locator("body").press("ArrowLeft")
    assert where()[:3] == start[:3]
    page.locator("body").press("ArrowLeft")
    assert int(where()[0]) == int(start[0]) - 1
    # Clicking a step's node in the diagram selects it.
    page.click('#diagram .step-node[data-step="2"]')
    page.wait_for_function("() => document.querySelector('#diagram').dataset.selected === '2'")
    assert page.inner_text("#step-pos").startswith("step 3 of")
    # The first step: prev is disabled; the highlighted code line is the first backward formula.
    page.locator("#code-lines li.bwd button").first.click()
    assert page.get_attribute("#diagram", "data-selected") == "0"
    assert page.is_disabled("#step-prev")
    assert page.inner_text("#code-lines li.current").startswith("out.g")
    assert_clean(w)


@pytest.mark.browser
@pytest.mark.fresh_page  # a dialog handler of its own
def test_a_bad_field_shows_its_error_next_to_it(watched):
    w = watched
    dialogs = []
    w.page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    w.open(SMALL)
    page = w.page
    page.fill("#f-in_features", "0")
    page.press("#f-in_features", "Tab")
    page.wait_for_function("() => document.querySelector('#err-in_features').textContent !== ''")
    assert "greater than or equal to 1" in page.inner_text("#err-in_features")
    assert page.get_attribute("#f-in_features", "aria-invalid") == "true"
    assert page.is_visible("#run-error") and "in_features" in page.inner_text("#run-error")
    assert page.inner_text("#err-batch") == ""
    assert "(8, 6, 4)" in diagram_text(page)  # the last good run stays drawn
    page.fill("#f-in_features", "7")
    page.press("#f-in_features", "Tab")
    page.wait_for_function(
        "() => document.querySelector('#diagram').textContent.includes('(8, 7, 4)')"
    )
    assert page.inner_text("#err-in_features") == ""
    assert dialogs == []
    assert_clean(w, allowed=[r"status of 422"])  # Chromium logs the refused request itself


@pytest.mark.browser
def test_explainer_shows_the_rule_and_the_clash(watched):
    w = watched
    w.open(SMALL)
    page = w.page
    page.fill("#bx-a", "8, 1, 4")
    page.fill("#bx-b", "3, 1")
    page.click("#explainer-form button[type=submit]")
    page.wait_for_function(
        "() => document.querySelector('#explainer-out').textContent.includes('(8, 3, 4)')"
    )
    out = page.locator("#explainer-out")
    assert out.locator("td.stretched").count() == 3  # a: dim 1; b: dims 0 and 2
    assert "g.sum(1, keepdim=True).reshape(8, 1, 4)" in out.inner_text()
    page.fill("#bx-b", "5")
    page.click("#explainer-form button[type=submit]")
    page.wait_for_function("() => document.querySelector('#bx-err').textContent !== ''")
    assert "dim -1: a has 4, b has 5" in page.inner_text("#bx-err")
    assert_clean(w, allowed=[r"status of 422"])


def test_page_serves_limits_and_local_plotly():
    """No browser: the form carries the schema's limits, and Plotly is served from here (the
    npm cartesian bundle when set-up fetched it, else the plotly package's), gzipped, cached."""
    client = TestClient(create_app())
    html = client.get("/").text
    assert re.search(r'id="f-in_features"[^>]*min="1"[^>]*max="16384"', html, re.S)
    assert re.search(r'id="f-max_cells"[^>]*max="1000000"', html, re.S)
    version = assets.bundled_plotly_version()
    src = re.search(
        r'<link rel="preload" as="script" href="(/vendor/plotly[^"]+)" id="plotly-js">', html
    )[1]
    assert src in (
        f"/vendor/plotly-cartesian-{version}.min.js",
        f"/vendor/plotly-{version}.min.js",
    )
    assert "https://" not in html and "http://" not in html
    js = client.get(src, headers={"accept-encoding": "gzip"})
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert js.headers["content-encoding"] == "gzip"
    assert "immutable" in js.headers["cache-control"]
    assert f"v{version}" in js.text[:300]  # the same plotly.js as the Python package's
    assert client.get("/vendor/plotly-0.0.0.min.js").status_code == 404


def test_without_the_npm_bundle_the_page_serves_the_full_one(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "VENDOR", tmp_path)  # set-up could not reach npm
    client = TestClient(create_app())
    name = f"plotly-{assets.bundled_plotly_version()}.min.js"
    assert f'href="/vendor/{name}"' in client.get("/").text
    assert client.get(f"/vendor/{name}").status_code == 200


@pytest.mark.browser
def test_compare_and_finite_differences_show_in_the_check_panel(watched):
    w = watched
    w.open("?batch=64&in_features=20&hidden=16&compare=true&fd_samples=4")
    page = w.page
    assert page.is_checked("#f-compare")
    strategies = page.locator("#compare-table tbody th")
    assert [strategies.nth(i).inner_text() for i in range(strategies.count())] == [
        "broadcast", "einsum", "matmul", "autograd",
    ]  # fmt: skip
    assert "fd result" in page.inner_text("#check-table thead")
    rows = page.locator("#check-table tbody tr:not(.intermediate)")
    # each row: the autograd verdict and the finite-difference verdict, both passing
    for i in range(rows.count()):
        assert rows.nth(i).locator(".verdict.pass").count() == 2, rows.nth(i).inner_text()
    assert_clean(w)
