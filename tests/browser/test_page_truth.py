"""The page tells the truth (issue 24, and issue 21's exercise header): no verdict beside a run
that contradicts it, a refused formula never leaves a green tick, a wrong gradient marked in
every view with its cause named, training that works by default on real data, and a phone
that never scrolls sideways."""

from urllib.parse import parse_qs, quote, urlsplit

import pytest
from conftest import Watched
from test_lab_page import REFUSED, check, line
from test_page import assert_clean

NET = "?batch=8&in_features=6&hidden=4"


def new_context(browser, base: str, width: int, height: int, **kw):
    """A browser context like the `watched` fixture's, at another size or for another server."""
    context = browser.new_context(viewport={"width": width, "height": height}, **kw)
    context.route(lambda url: not url.startswith(base + "/"), lambda route: route.abort())
    context.set_default_timeout(120_000)
    return context


def header(page) -> dict:
    """The header's verdict: its text and whether anything in it is drawn green."""
    return page.evaluate(
        """() => ({text: document.getElementById('summary-verdict').textContent,
                   green: document.querySelectorAll('#summary .ok').length,
                   cls: document.getElementById('summary-verdict').className})"""
    )


def verdicts(page) -> dict[str, str]:
    return dict(
        page.locator("#check-table tbody tr").evaluate_all(
            "rows => rows.map(r => [r.dataset.name, r.querySelector('.verdict').textContent])"
        )
    )


@pytest.mark.browser
def test_a_value_bug_chosen_after_a_shape_bug_replaces_it_and_fails_the_check(watched):
    w = watched
    w.open(NET)
    page = w.page
    page.select_option("#lab-bugs", "x-no-unsqueeze")
    w.wait_drawn()
    assert line(page, "x.g").locator(".lab-error").count() == 1  # refused at x.g
    page.select_option("#lab-bugs", "relu-no-mask")
    w.wait_drawn()
    # alone: the shape bug is gone, so the value bug runs and fails the check
    q = parse_qs(urlsplit(page.url).query)
    assert "f.x.g" not in q and q["f.l1.g"] == ["a1.g"]
    assert page.locator(".lab-error").count() == 0
    h = header(page)
    assert h["text"].startswith("✗") and h["green"] == 0, h
    assert verdicts(page)["l1"] == "FAIL" and verdicts(page)["x"] == "FAIL"
    lesson = page.locator("#lab-lesson")
    assert "waiting" not in lesson.get_attribute("class")
    assert "without its mask" in lesson.inner_text()
    assert_clean(w, allowed=[REFUSED])


@pytest.mark.browser
def test_combined_bugs_never_show_a_lesson_beside_a_contradicting_verdict(watched):
    w = watched
    w.open(NET)
    page = w.page
    page.check("#lab-combine")
    page.select_option("#lab-bugs", "x-no-unsqueeze")
    w.wait_drawn()
    page.check("#lab-combine")  # the bar was drawn again: the tick stays
    assert page.is_checked("#lab-combine")
    page.select_option("#lab-bugs", "relu-no-mask")
    w.wait_drawn()
    q = parse_qs(urlsplit(page.url).query)
    assert "f.x.g" in q and "f.l1.g" in q  # both, as asked
    # the run is refused at x.g: the value bug's lesson is not shown beside the old pass
    value = page.locator('.lab-lesson[data-bug="relu-no-mask"]')
    assert "waiting" in value.get_attribute("class")
    assert "refused at x.g" in value.inner_text()
    shape = page.locator('.lab-lesson[data-bug="x-no-unsqueeze"]')
    assert "waiting" not in shape.get_attribute("class")
    assert header(page)["green"] == 0
    assert_clean(w, allowed=[REFUSED])


@pytest.mark.browser
def test_after_a_refused_formula_the_page_shows_the_last_run_that_worked_greyed(watched):
    w = watched
    w.open(NET)
    page = w.page
    assert header(page)["green"] == 1  # the reference run: a true green tick
    check(w, "x.g", "(l1.g * w1).sum(-1)")
    line(page, "x.g").locator(".lab-error").wait_for()
    h = header(page)
    assert h["green"] == 0 and "stale" in h["cls"], h
    assert "last run that worked" in page.inner_text("#summary")
    # the refused line has no verdict of its own; the charts and table say what they are
    assert line(page, "x.g").locator(".lab-mark").count() == 0
    assert "stale" in page.get_attribute("#main", "class")
    notes = page.locator(".stale-note")
    assert notes.count() == 2 and all("last run that worked" in t for t in notes.all_inner_texts())
    # fixed: the truth again, in green
    check(w, "x.g", "(l1.g.unsqueeze(1) * w1).sum(-1)")
    assert header(page)["green"] == 1 and page.locator(".stale-note:visible").count() == 0
    assert "stale" not in page.get_attribute("#main", "class")
    assert_clean(w, allowed=[REFUSED])


@pytest.mark.browser
def test_an_exercise_header_counts_what_is_written_and_hides_the_answers(watched):
    w = watched
    w.open(f"{NET}&hide=x.g,w1.g")
    page = w.page
    h = header(page)
    assert h["text"] == "Exercise: 0 of 2 written" and h["green"] == 0, h
    assert "pass" not in page.get_attribute("#check .check-summary", "class")
    # no leak: the Break-it menu has no bug of a hidden gradient, the learner cannot untick
    options = page.locator("#lab-bugs option").all_inner_texts()
    assert not [o for o in options if o.startswith(("x.g", "w1.g"))], options
    assert page.locator("#lab-make").count() == 0
    assert page.input_value("#bx-a") != "1000, 1, 50"
    check(w, "x.g", "l1.g @ w1.T")
    assert header(page)["text"] == "Exercise: 1 of 2 written"
    check(w, "w1.g", "x.T @ l1.g")
    h = header(page)
    assert h["text"].startswith("✓") and h["green"] == 1, h
    assert_clean(w)


@pytest.mark.browser
def test_a_wrong_w1g_marks_its_card_in_the_default_view(watched):
    w = watched
    w.open(f"{NET}&f.w1.g={quote('x.T @ l1.g / 1000')}")
    page = w.page
    assert page.is_checked('input[name="grad-view"][value="manual"]')
    card = page.locator('.heatmap-card[data-name="w1"]')
    assert "failing" in card.get_attribute("class")
    assert "differs from autograd" in card.locator(".fail-badge").inner_text()
    assert "fix this one" in card.locator(".fail-badge").inner_text()  # the cause
    for ok in ("x", "b1", "w2", "b2"):  # x.g comes before w1.g and does not use it
        card_ok = page.locator(f'.heatmap-card[data-name="{ok}"]')
        assert "failing" not in card_ok.get_attribute("class"), ok
    card.locator("button.show-difference").click()
    w.wait_drawn()
    assert page.is_checked('input[name="grad-view"][value="difference"]')
    assert "failing" in card.get_attribute("class")  # in the difference view too
    assert "view=difference" in page.url
    assert_clean(w)


@pytest.mark.browser
def test_downstream_failures_are_attributed_to_the_first_wrong_gradient(watched):
    w = watched
    w.open(f"{NET}&f.l1.g=a1.g")
    page = w.page
    blame = dict(
        page.locator("#check-table tbody tr").evaluate_all(
            "rows => rows.map(r => [r.dataset.name, r.querySelector('.blame')?.textContent ?? ''])"
        )
    )
    assert "first wrong gradient" in blame["l1"]
    for name in ("x", "w1", "b1"):
        assert blame[name] == "wrong because it uses l1.g", (name, blame)
    assert blame["w2"] == blame["b2"] == ""
    assert "the first wrong: l1.g" in header(page)["text"]
    assert line(page, "x.g").locator(".lab-blame").inner_text() == "uses l1.g"
    assert line(page, "l1.g").locator(".lab-blame").inner_text() == "fix this first"
    assert_clean(w)


@pytest.mark.browser
def test_a_phone_with_mnist_data_never_scrolls_sideways(browser, server):
    context = new_context(browser, server, 390, 844, is_mobile=True)
    page = context.new_page()
    try:
        page.goto(f"{server}/?data=mnist")
        page.wait_for_function(
            "() => document.body.dataset.state === 'ready' && document.body.dataset.pendingAll"
            " === '0' && document.querySelector('#data-w1g .main-svg')"
        )
        width = page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 390, width
        # the wide figures scroll in their own boxes
        assert page.evaluate("() => document.querySelector('#data-w1g').scrollWidth") > 390
        # the check's verdict is on screen, and the code panel's bar is not cut
        right = page.evaluate(
            "() => document.querySelector('#check-table tr[data-name=\"x\"] .verdict')"
            ".getBoundingClientRect().right"
        )
        assert 0 < right <= 390, right
        bar = page.evaluate("() => [document.getElementById('lab-bar').scrollWidth,"
                            " document.getElementById('lab-bar').clientWidth]")  # fmt: skip
        assert bar[0] <= bar[1], bar
    finally:
        context.close()


# --- training -----------------------------------------------------------------------------


@pytest.mark.browser
def test_mnist_starts_from_settings_that_train_and_reaches_85_percent(browser, server):
    base = server  # its runs use one torch thread (tests/conftest.py)
    context = new_context(browser, base, 1280, 800)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    ready = (
        "() => document.body.dataset.state === 'ready' && document.querySelector('#loading').hidden"
    )
    try:
        page.goto(f"{base}/")
        page.wait_for_function(ready)
        assert page.is_hidden("#train-recipe")
        page.select_option("#f-data", "mnist")
        page.wait_for_function(
            ready + " && document.getElementById('f-out_features').value === '10'"
        )
        assert (page.input_value("#f-init"), page.input_value("#f-loss")) == (
            "kaiming",
            "cross_entropy",
        )
        assert "settings that train" in page.inner_text("#train-recipe").lower()
        assert page.input_value("#t-steps") == "500"  # the panel's defaults, untouched
        page.click("#train-start")
        page.wait_for_function(
            "() => document.getElementById('train-panel').dataset.state === 'done'"
        )
        status = page.inner_text("#train-status")
        assert status.startswith("Done: 500 steps") and "diverged" not in status, status
        assert float(page.get_attribute("#train-panel", "data-val-accuracy")) >= 0.85
        assert page.is_hidden("#train-verdict") and page.is_hidden("#train-diverged")
        # the article's randn is one click away, and a link keeps that choice
        page.click("#recipe-article")
        page.wait_for_function(ready + " && document.getElementById('f-init').value === 'randn'")
        assert page.input_value("#f-loss") == "mse" and "recipe=article" in page.url
        page.reload()
        page.wait_for_function(ready)
        assert page.input_value("#f-init") == "randn"
        assert "overflows" in page.inner_text("#train-recipe")
        # ... where it diverges, and says why, without blaming the gradients
        page.fill("#t-steps", "60")
        page.click("#train-start")
        page.wait_for_function(
            "() => document.getElementById('train-panel').dataset.state === 'done'"
        )
        assert "diverged" in page.inner_text("#train-status")
        advice = page.inner_text("#train-diverged")
        assert "Diverged at step" in advice and "init randn" in advice and "smaller lr" in advice
        assert page.is_hidden("#train-verdict")
        assert "differed" not in page.inner_text("#train-status")
        assert errors == []
    finally:
        context.close()


@pytest.mark.browser
def test_training_runs_stay_side_by_side_and_a_wrong_formula_is_a_red_banner(watched):
    w = watched
    w.open("?data=digits&loss=cross_entropy&init=kaiming&hidden=16&batch=64")
    page = w.page
    done = "() => document.getElementById('train-panel').dataset.state === 'done'"
    page.fill("#t-steps", "40")
    page.fill("#t-eval_every", "20")
    page.click("#train-start")
    page.wait_for_function(done)
    assert page.is_hidden("#train-verdict")
    check(w, "w1.g", "-(x.T @ l1.g)")
    page.fill("#t-steps", "40")
    page.click("#train-start")
    page.wait_for_function(done)
    banner = page.locator("#train-verdict")
    assert banner.is_visible() and "differed from autograd at 3 of 3" in banner.inner_text()
    assert "w1.g = -(x.T @ l1.g)" in banner.inner_text()
    names = page.evaluate("() => document.getElementById('train-curves').data.map(t => t.name)")
    assert names[0] == "run 1: built-in" and names[3].startswith("run 2: yours: w1.g")
    rows = page.locator("#train-runs tbody tr")
    assert rows.count() == 2
    accs = rows.locator("td.acc").all_inner_texts()
    assert all(a.endswith("%") for a in accs), accs
    assert "✓" in rows.nth(0).inner_text() and "✗ differed" in rows.nth(1).inner_text()
    # a typed formula not checked: training would not use it, and the panel says so
    line(page, "w1.g").locator("textarea").fill("x.T @ l1.g")
    assert "w1.g" in page.inner_text("#train-unchecked")
    assert_clean(w, allowed=[REFUSED])


SMALL_TEXT = """() => {
  const small = [];
  for (const el of document.querySelectorAll('body *')) {
    if (el.closest('svg') || !el.getClientRects().length) continue;
    if (![...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim())) continue;
    const px = parseFloat(getComputedStyle(el).fontSize);
    if (px < 17.9) small.push(`${el.tagName}.${el.className} ${px}px: ${el.textContent.trim().slice(0, 30)}`);
  }
  for (const t of document.querySelectorAll('main svg text')) {
    if (!t.getClientRects().length || !t.textContent.trim()) continue;
    const svg = t.ownerSVGElement;
    const box = svg.viewBox.baseVal;
    const scale = box && box.width ? svg.getBoundingClientRect().width / box.width : 1;
    const px = parseFloat(getComputedStyle(t).fontSize) * scale;
    if (px < 17.9) small.push(`svg in #${t.closest('[id]')?.id} ${px}px: ${t.textContent.slice(0, 20)}`);
  }
  return small;
}"""


@pytest.mark.browser
def test_presentation_mode_shows_every_text_at_18px_one_section_at_a_time(browser, server):
    context = new_context(browser, server, 1920, 1080)
    page = context.new_page()
    w = Watched(page, server)
    try:
        w.open("?present=1&data=digits&loss=cross_entropy&init=kaiming&hidden=16&batch=64")
        for tab in ("diagram", "gradients", "check", "explainer", "train"):
            page.click(f'.present-tabs button[data-tab="{tab}"]')
            w.wait_drawn()
            assert page.evaluate(SMALL_TEXT) == [], tab
            # Train and the data images only under their own tabs
            assert page.is_visible("#train-panel") == (tab == "train"), tab
            assert page.is_visible("#data-panel") == (tab == "gradients"), tab
    finally:
        context.close()


@pytest.mark.browser
def test_an_exercise_hint_waits_until_the_learner_asks(watched):
    w = watched
    w.open(f"{NET}&hide=x.g")
    page = w.page
    check(w, "x.g", "(l1.g * w1).sum(-1)")
    err = line(page, "x.g").locator(".lab-error")
    err.wait_for()
    assert "8 vs 6" in err.inner_text()  # what is wrong, at once
    assert err.locator(".lab-hint").is_hidden() and "unsqueeze(1)" not in err.inner_text()
    err.locator("button.lab-show-hint").click()
    assert "unsqueeze(1)" in err.locator(".lab-hint").inner_text()
    assert_clean(w, allowed=[REFUSED])


@pytest.mark.browser
def test_the_page_does_not_jump_on_load(browser, server):
    context = new_context(browser, server, 1280, 800)
    context.add_init_script(
        "window.__shift = 0; new PerformanceObserver((list) => { for (const e of"
        " list.getEntries()) window.__shift += e.value; })"
        ".observe({type: 'layout-shift', buffered: true});"
    )
    page = context.new_page()
    w = Watched(page, server)
    try:
        w.open()
        page.wait_for_timeout(500)
        shift = page.evaluate("() => window.__shift")
        assert shift < 0.05, shift  # was 0.71: the cards below were pushed down by the run
    finally:
        context.close()
