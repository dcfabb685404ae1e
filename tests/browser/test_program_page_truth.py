"""The program page tells the truth (issue 35), in a real browser: a refused program greys the
last run that worked and keeps its first-failure mark, a correct pinned-dtype line is never
suspect, a line error has no "null" and prints its hint once, with code as code, Escape then
Tab leaves a code pane, a wrong reduction names its tensor, inputs keep their order and count,
a blank start and CS231n's shortcut read as what they are, a refused download says why, the
file keeps the server's name, and a busy server is waited out."""

import json

import pytest

from app.programs import presets
from tests.browser.test_program_page import MAKEMORE, edit, open_program, runs, verdict, wait_run

BROKEN_DH = MAKEMORE["backward"].replace("dh = dlogits @ W2.T", "dh = dlogits @ W2.T * 2")
LOOP = MAKEMORE["backward"][MAKEMORE["backward"].index("dC = torch.zeros_like(C)") :]


def stale(w) -> bool:
    return w.page.get_attribute("body", "data-stale") == "1"


@pytest.mark.browser
def test_a_refused_program_greys_the_last_run_and_keeps_its_first_failure_mark(watched):
    w = watched
    open_program(w, "?preset=makemore")
    page = w.page
    edit(w, "backward", BROKEN_DH)
    assert verdict(w) == "fail" and not stale(w)
    assert "bad" in page.get_attribute("#backward-editor .ln[data-line='16']", "class")
    for refused in (BROKEN_DH + "\nfoo = torch.fancy(dh)\n", BROKEN_DH + "\ndW2 = h.T @@ x\n"):
        edit(w, "backward", refused)
        assert verdict(w) == "error" and stale(w)
        text = page.inner_text("#verdict")
        assert "nothing was checked" in text and "Showing the last run that worked" in text
        assert "stale" in page.get_attribute("#main", "class")
        assert page.locator(".stale-note:visible").count() == 3
        # the table is greyed (not at full opacity) and still the last run's
        opacity = page.eval_on_selector("#checks", "t => getComputedStyle(t).opacity")
        assert float(opacity) < 0.6
        # the first failure's mark stays in the pane, beside the refused line's
        assert "bad" in page.get_attribute("#backward-editor .ln[data-line='16']", "class")
        assert "err" in page.get_attribute("#backward-editor .ln[data-line='44']", "class")
    edit(w, "backward", MAKEMORE["backward"])
    assert verdict(w) == "all-match" and not stale(w)
    assert page.locator(".stale-note:visible").count() == 0
    assert all("422" in e for e in w.errors)


@pytest.mark.browser
def test_a_correct_one_hot_line_is_a_match_never_suspect(watched):
    w = watched
    open_program(w, "?preset=makemore")
    one_hot = "dC = F.one_hot(Xb.view(-1), num_classes=27).float().T @ demb.view(-1, 10)"
    edit(
        w, "backward", MAKEMORE["backward"].replace(LOOP, f"dC = torch.zeros_like(C)\n{one_hot}\n")
    )
    assert verdict(w) == "all-match"
    assert "suspect" not in w.page.inner_text("#verdict")
    assert "st-match" in w.page.get_attribute("#checks tr[data-name='C']", "class")
    assert w.errors == []


@pytest.mark.browser
def test_a_line_error_has_no_null_and_says_its_hint_once_with_code_as_code(watched):
    w = watched
    open_program(w, "?preset=makemore")
    page = w.page
    edit(w, "backward", MAKEMORE["backward"] + "\nfoo = torch.fancy(dh)\n")
    box = page.inner_text("#backward-error")
    assert "null" not in box and "`" not in box
    assert page.locator("#backward-error code", has_text="torch.fancy").count() == 1
    edit(
        w,
        "backward",
        MAKEMORE["backward"].replace("dembcat = dhprebn @ W1.T", "dembcat = dhprebn @ W1"),
    )
    box = page.inner_text("#backward-error")
    assert "null" not in box and "`" not in box
    assert box.count("is (32, 30)") == 1  # the hint, once
    assert page.locator("#backward-error .shapes").count() == 0  # the message's table shows them
    assert "W1       [ 30  64 ]" in box


@pytest.mark.browser
def test_escape_then_tab_leaves_a_code_pane(watched):
    w = watched
    open_program(w, "?preset=makemore")
    page = w.page
    area = "#forward-editor textarea"
    assert "Escape, then Tab" in page.get_attribute(area, "aria-label")
    assert "Esc" in page.inner_text("#forward-pane .pane-head")
    page.focus(area)
    page.evaluate(
        "() => document.querySelector('#forward-editor textarea').setSelectionRange(0, 0)"
    )
    before = runs(w)
    page.keyboard.press("Tab")  # indents
    assert page.input_value(area).startswith("    emb")
    assert page.evaluate(
        "() => document.activeElement === document.querySelector('#forward-editor textarea')"
    )
    page.keyboard.press("Escape")
    page.keyboard.press("Tab")  # moves on
    assert page.evaluate(
        "() => document.activeElement !== document.querySelector('#forward-editor textarea')"
    )
    assert page.input_value(area).startswith("    emb") and not page.input_value(area).startswith(
        "        "
    )
    wait_run(w, before)


@pytest.mark.browser
def test_a_sum_over_the_wrong_dim_names_b1_and_the_batch_dim(watched):
    w = watched
    open_program(w, "?preset=makemore")
    edit(
        w, "backward", MAKEMORE["backward"].replace("db1 = dhprebn.sum(0)", "db1 = dhprebn.sum(1)")
    )
    why = w.page.inner_text("#checks tr.why")
    assert "db1 must have b1's shape (64,)" in why and "d's shape" not in why
    assert ".sum(0)" in why and "batch" in why


@pytest.mark.browser
def test_inputs_keep_their_order_and_count_and_say_what_each_key_means(watched):
    w = watched
    open_program(w, "?preset=makemore")
    page = w.page
    shown = list(json.loads(page.input_value("#inputs")))
    assert shown == list(MAKEMORE["inputs"])  # the preset's order: the numbers it draws
    assert shown != sorted(shown)
    page.click("#inputs-box summary")
    help_text = page.inner_text("#inputs-box")
    assert (
        '"grad": false' in help_text and "randint" in help_text and '"data": "names"' in help_text
    )
    assert page.inner_text("#inputs-summary") == f"({len(MAKEMORE['inputs'])})"
    fewer = {k: v for k, v in list(MAKEMORE["inputs"].items())[:7]}
    before = runs(w)
    page.fill("#inputs", json.dumps(fewer))
    assert page.inner_text("#inputs-summary") == "(7)"
    wait_run(w, before)


@pytest.mark.browser
def test_the_page_loss_is_the_preset_request_loss(watched, client):
    w = watched
    open_program(w, "?preset=makemore")
    loss = client.post("/api/program", json=MAKEMORE).json()["loss"]
    assert f"loss {float(f'{loss:.4g}')}" in w.page.inner_text("#verdict")  # num(loss, 4)


@pytest.mark.browser
def test_a_blank_start_and_the_cs231n_shortcut_read_as_what_they_are(watched):
    w = watched
    open_program(w, "?preset=cs231n")
    page = w.page
    assert verdict(w) == "params-match"
    text = page.inner_text("#verdict")
    assert "Every parameter's gradient matches" in text and "dprobs" in text
    before = runs(w)
    page.select_option("#preset", "blank")
    wait_run(w, before)
    assert "h = x @ W + b" in page.input_value("#forward-editor textarea")
    assert "# TODO: write dW, db" in page.input_value("#backward-editor textarea")
    assert verdict(w) == "incomplete"
    assert w.errors == []


@pytest.mark.browser
def test_downloads_keep_the_server_name_and_a_refused_one_says_why(watched):
    w = watched
    open_program(w, "?preset=makemore")
    page = w.page
    with page.expect_download() as got:
        page.click(".share [data-format='py']")
    assert got.value.suggested_filename == "broadprop_program.py"
    edit(w, "backward", MAKEMORE["backward"] + "\nfoo = torch.fancy(dh)\n")
    page.click(".share [data-format='py']")
    page.wait_for_function(
        "() => document.getElementById('share-status').textContent.includes('failed')"
    )
    status = page.inner_text("#share-status")
    assert "line 44 of the backward" in status and "torch.fancy" in status
    assert "answered 422" not in status


@pytest.mark.browser
@pytest.mark.fresh_page  # a route of its own
def test_the_program_page_waits_out_a_busy_server(watched):
    w = watched
    page = w.page
    busy = {"left": 1}

    def answer(route):
        if busy["left"]:
            busy["left"] -= 1
            route.fulfill(status=503, headers={"Retry-After": "1"}, body='{"detail": "busy"}')
        else:
            route.continue_()

    page.route("**/api/program", answer)
    page.goto(f"{w.base}/program?preset=makemore")
    page.wait_for_function("() => document.body.dataset.queued === '1'")
    wait_run(w, 0)
    assert verdict(w) == "all-match" and busy["left"] == 0


def test_the_first_step_button_has_no_glyph_chromium_lacks(client):
    html = client.get("/").text
    assert "⏮" not in html and "First</button>" in html


def test_presets_reach_the_page_in_their_order(client):
    html = client.get("/program").text
    start = html.index('id="program-presets">') + len('id="program-presets">')
    shipped = json.loads(html[start : html.index("</script>", start)])
    for p, sent in zip(presets.PRESETS, shipped, strict=True):
        assert list(sent["request"]["inputs"]) == list(p["request"]["inputs"])


@pytest.mark.browser
def test_presentation_mode_makes_the_code_large_and_keeps_the_marks_on_their_lines(watched):
    w = watched
    open_program(w, "?preset=makemore&present=1")
    page = w.page
    assert "present" in page.get_attribute("body", "class")
    size = page.eval_on_selector("#forward-editor textarea", "t => getComputedStyle(t).fontSize")
    assert float(size.removesuffix("px")) >= 18
    edit(w, "backward", BROKEN_DH)
    assert "present=1" in page.url  # an edit keeps the mode in the link
    band = page.eval_on_selector("#backward-editor .band.bad", "b => b.getBoundingClientRect().top")
    line = page.eval_on_selector(
        "#backward-editor .ln[data-line='16']", "l => l.getBoundingClientRect().top"
    )
    assert abs(band - line) <= 2  # the band sits on line 16 at the larger line height
    page.click("#present")
    assert "present" not in (page.get_attribute("body", "class") or "")


@pytest.mark.browser
def test_a_phone_verdict_ends_without_a_dangling_separator(browser, server):
    context = browser.new_context(viewport={"width": 390, "height": 844})
    try:
        page = context.new_page()
        page.goto(f"{server}/program?preset=makemore")
        page.wait_for_function("() => document.body.dataset.state === 'ready'", timeout=90_000)
        assert not page.inner_text("#verdict").rstrip().endswith("·")
    finally:
        context.close()


@pytest.mark.browser
def test_issue_35_12_a_blank_start_stays_a_blank_start_until_it_is_edited(watched):
    """35.12: "A blank start" turned into "(edited: your own)" at its first URL write."""
    w = watched
    open_program(w, "?preset=makemore")
    page = w.page
    before = runs(w)
    page.select_option("#preset", "blank")
    wait_run(w, before)
    page.wait_for_function("() => location.search === '?preset=blank'")
    page.wait_for_timeout(400)  # past the debounce: any later URL write has happened
    assert page.input_value("#preset") == "blank"
    page.reload()
    wait_run(w, 0)
    assert page.input_value("#preset") == "blank"
    assert "# TODO: write dW, db" in page.input_value("#backward-editor textarea")
    edit(w, "backward", "dh = 2 * h\ndW = x.T @ dh\n# TODO: write db\n")
    page.wait_for_function("() => location.search.startsWith('?p=')")
    assert page.input_value("#preset") == ""  # now it is the learner's own
    assert w.errors == []


def form_row(page, name: str):
    return page.locator(f"#inputs-form tr[data-name='{name}']")


@pytest.mark.browser
def test_issue_35_11_inputs_have_a_form_that_edits_the_program(watched):
    """35.11: the Inputs box was raw JSON. The form shows each input's kind and only the fields
    that kind reads, each with its help; it and the JSON edit the same inputs."""
    w = watched
    open_program(w, "?preset=makemore")
    page = w.page
    page.click("#inputs-box summary")
    names = page.eval_on_selector_all("#inputs-form tbody tr", "rs => rs.map(r => r.dataset.name)")
    assert names == list(MAKEMORE["inputs"])  # the preset's order
    # each kind shows its own fields: names data, a value, randn with its scale
    xb = form_row(page, "Xb")
    assert xb.locator("select[name=kind]").input_value() == "names"
    assert xb.locator("[name=block_size]").input_value() == "3"
    assert xb.locator("[name=shape]").count() == 0
    assert form_row(page, "n").locator("select[name=kind]").input_value() == "value"
    assert page.get_attribute("#inputs-form th[title]:text('grad')", "title").startswith(
        "Gets a gradient"
    )
    # the blank start: untick b's gradient, make it zeros; the JSON and the check follow
    before = runs(w)
    page.select_option("#preset", "blank")
    wait_run(w, before)
    assert page.locator("#checks tr[data-name='b']").count() == 1
    before = runs(w)
    form_row(page, "b").locator("select[name=kind]").select_option("zeros")
    form_row(page, "b").locator("input[name=grad]").uncheck()
    wait_run(w, before)
    page.wait_for_function(
        "() => JSON.parse(document.getElementById('inputs').value).b.grad === false"
    )
    assert json.loads(page.input_value("#inputs"))["b"] == {
        "shape": [2], "init": "zeros", "grad": False,
    }  # fmt: skip
    page.wait_for_function("() => !document.querySelector(\"#checks tr[data-name='b']\")")
    # a bad shape is said at its field and nothing is sent
    before = runs(w)
    form_row(page, "W").locator("input[name=shape]").fill("3, x")
    assert "W: shape" in page.inner_text("#input-form-error")
    assert form_row(page, "W").locator("input[name=shape]").get_attribute("aria-invalid") == "true"
    form_row(page, "W").locator("input[name=shape]").fill("3, 2")
    wait_run(w, before)
    assert page.inner_text("#input-form-error") == ""
    # an input added counts, and the JSON box edits the form back
    page.click("#input-add")
    assert page.inner_text("#inputs-summary") == "(4)"
    page.fill("#inputs", json.dumps({"x": {"shape": [4, 3], "grad": False},
                                     "W": {"shape": [3, 2]}, "b": {"shape": [2]}}))  # fmt: skip
    page.wait_for_function("() => document.querySelectorAll('#inputs-form tbody tr').length === 3")
    assert form_row(page, "x").locator("input[name=grad]").is_checked() is False
    assert [e for e in w.errors if "422" not in e] == []


@pytest.mark.browser
@pytest.mark.parametrize("width", [1280, 390])
def test_issue_35_13_sampled_names_are_all_in_view_inside_the_train_card(browser, server, width):
    """35.13: the sampled names were clipped by the Train card's edge (a list that scrolled in
    340 px, with no sign of it)."""
    from tests.browser.conftest import Watched

    context = browser.new_context(viewport={"width": width, "height": 844})
    context.route(lambda url: not url.startswith(server + "/"), lambda route: route.abort())
    context.set_default_timeout(120_000)
    w = Watched(context.new_page(), server)
    try:
        open_program(w, "?preset=makemore")
        page = w.page
        page.fill("#pt-steps", "20")
        page.click("#train-start")
        page.wait_for_function(
            "() => document.getElementById('train-panel').dataset.state === 'done'"
        )
        box = page.evaluate(
            """() => { const ol = document.getElementById('samples');
                const card = document.getElementById('train-panel').getBoundingClientRect();
                const items = [...ol.querySelectorAll('li')].map(li => li.getBoundingClientRect());
                return { n: items.length, scrolls: ol.scrollHeight > ol.clientHeight + 1,
                         out: items.filter(r => r.bottom > card.bottom || r.right > card.right
                                                || r.left < card.left).length,
                         cut: [...ol.querySelectorAll('li')].filter(li => li.scrollWidth > li.clientWidth + 1).length }; }"""
        )
        assert box["n"] >= 10 and not box["scrolls"] and box["out"] == 0 and box["cut"] == 0, box
        page.locator("#train-panel").screenshot(path=f"/tmp/train-samples-{width}.png")
    finally:
        context.close()
