"""The program page (GET /program) in a real browser: a preset checks all-close and draws
every name, a broken line marks its row and its line, the URL reproduces an edited program,
hidden lines never read as all-match, errors show at their line, and training draws curves."""

import pytest

from app.programs import presets

MAKEMORE = next(p for p in presets.PRESETS if p["id"] == "makemore")["request"]
INTERMEDIATES = [line.split(" = ")[0] for line in MAKEMORE["forward"].strip().splitlines()]
TANH_RIGHT = "dhpreact = (1.0 - h ** 2) * dh"
TANH_WRONG = "dhpreact = (1.0 - hpreact ** 2) * dh"


def open_program(w, query: str) -> None:
    w.page.goto(f"{w.base}/program{query}")
    wait_run(w, 0)


def runs(w) -> int:
    return int(w.page.get_attribute("body", "data-runs") or 0)


def wait_run(w, before: int) -> None:
    """Until a run after `before` runs has been drawn (or refused)."""
    w.page.wait_for_function(
        f"() => Number(document.body.dataset.runs || 0) > {before}"
        " && document.body.dataset.state !== 'loading'",
        timeout=90_000,
    )


def edit(w, which: str, text: str) -> None:
    before = runs(w)
    w.page.fill(f"#{which}-editor textarea", text)
    wait_run(w, before)


def verdict(w) -> str:
    return w.page.get_attribute("#verdict", "data-verdict")


@pytest.mark.browser
def test_the_makemore_preset_checks_all_close_and_draws_every_name(watched):
    w = watched
    open_program(w, "?preset=makemore")
    page = w.page
    assert verdict(w) == "all-match"
    assert "All 26 gradients written" in page.inner_text("#verdict")
    rows = page.eval_on_selector_all(
        "#checks tbody tr[data-name]", "rs => rs.map(r => r.dataset.name)"
    )
    assert len(rows) == 26 and rows[0] == "logprobs" and rows[-1] == "C"  # the backward's order
    drawn = page.eval_on_selector_all("#flow .node", "ns => ns.map(n => n.dataset.name)")
    assert set(INTERMEDIATES) <= set(drawn) and {"C", "W1", "Xb"} <= set(drawn)
    assert page.locator("#flow .edge.bcast").count() >= 5
    # the selected gradient's three maps are drawn
    page.wait_for_function("() => document.body.dataset.maps === 'C'")
    assert page.locator("#map-manual .main-svg").count() >= 1
    assert page.locator("#map-difference .main-svg").count() >= 1
    # clicking a name selects its forward line, its backward lines and its maps
    page.click("#flow .node[data-name='hpreact']")
    page.wait_for_function("() => document.body.dataset.maps === 'hpreact'")
    assert "sel" in page.get_attribute("#forward-editor .ln[data-line='10']", "class")
    assert "sel" in page.get_attribute("#backward-editor .ln[data-line='20']", "class")
    assert page.get_attribute("#checks tr[data-name='hpreact']", "class").endswith("selected")
    assert w.errors == [] and w.foreign() == []


@pytest.mark.browser
def test_a_broken_line_marks_its_row_and_its_line_and_the_url_reproduces_it(watched, browser):
    w = watched
    open_program(w, "?preset=makemore")
    page = w.page
    broken = MAKEMORE["backward"].replace(TANH_RIGHT, TANH_WRONG)
    edit(w, "backward", broken)
    assert verdict(w) == "fail"
    assert "dhpreact" in page.inner_text("#verdict")
    first = page.locator("#checks tr[data-name='hpreact']")
    assert "st-first" in first.get_attribute("class")
    assert "first failure" in first.inner_text()
    assert "tanh" in page.inner_text("#checks tr.why.st-first")  # the slip's hint
    after = page.locator("#checks tr[data-name='bngain']")
    assert "st-after" in after.get_attribute("class") and "uses dhpreact" in after.inner_text()
    assert "st-match" in page.get_attribute("#checks tr[data-name='h']", "class")  # upstream
    line = broken.splitlines().index(TANH_WRONG) + 1
    assert "bad" in page.get_attribute(f"#backward-editor .ln[data-line='{line}']", "class")
    assert page.locator(f"#backward-editor .band.bad[data-line='{line}']").count() == 1
    # the URL now carries the program: a fresh page opens the same text and verdict
    page.wait_for_function("() => location.search.startsWith('?p=')")
    url = page.url
    other = browser.new_page()
    try:
        other.goto(url)
        other.wait_for_function(
            "() => Number(document.body.dataset.runs || 0) > 0 && document.body.dataset.state !== 'loading'"
        )
        assert other.input_value("#backward-editor textarea") == broken
        assert other.input_value("#forward-editor textarea") == MAKEMORE["forward"]
        assert other.get_attribute("#verdict", "data-verdict") == "fail"
    finally:
        other.close()
    assert w.errors == []


@pytest.mark.browser
def test_hidden_lines_never_read_as_all_match(watched):
    w = watched
    open_program(w, "?preset=makemore&hide=dW1,dC")
    page = w.page
    assert verdict(w) == "incomplete"
    text = page.inner_text("#verdict")
    assert "24 of 26 written" in text and "All" not in text
    backward = page.input_value("#backward-editor textarea")
    assert "dW1 =" not in backward and "for k in range" not in backward
    assert "# TODO: write dW1" in backward and "# TODO: write dC" in backward
    assert page.locator("#backward-editor .ln.hidden").count() == 2
    page.click("#show-todo")
    assert page.inner_text("#todo").count("d") >= 2 and "dW1" in page.inner_text("#todo")
    page.click("#show-code")
    # writing dW1 and dC back, with a placeholder left, still does not say all-match
    restored = backward.replace("# TODO: write dW1", "dW1 = embcat.T @ dhprebn")
    restored = restored.replace("# TODO: write dC", "dC = torch.zeros_like(C)\n# TODO: write dC")
    edit(w, "backward", restored)
    assert verdict(w) != "all-match"
    assert page.is_disabled(".share [data-format='py']")  # an exercise's file waits too
    assert w.errors == []


@pytest.mark.browser
def test_errors_show_at_their_line_with_shapes(watched):
    w = watched
    open_program(w, "?preset=makemore")
    page = w.page
    clash = MAKEMORE["backward"].replace("dh = dlogits @ W2.T", "dh = dlogits @ W2")
    edit(w, "backward", clash)
    assert verdict(w) == "error"
    box = page.inner_text("#backward-error")
    assert "Line 16" in box and "(32, 27)" in box and "(64, 27)" in box
    assert "err" in page.get_attribute("#backward-editor .ln[data-line='16']", "class")
    edit(w, "backward", MAKEMORE["backward"])
    assert verdict(w) == "all-match" and page.is_hidden("#backward-error")
    # a refused forward (422) shows at its line in its own pane
    edit(w, "forward", MAKEMORE["forward"].replace("h @ W2 + b2", "h @ W2.T + b2"))
    assert verdict(w) == "error"
    assert "Line 12" in page.inner_text("#forward-error")
    assert "err" in page.get_attribute("#forward-editor .ln[data-line='12']", "class")
    # FastAPI's 422 is the answer: the console says so, and nothing else
    assert all("422" in e for e in w.errors)


@pytest.mark.browser
def test_training_draws_curves_and_a_second_training_joins_the_chart(watched):
    w = watched
    open_program(w, "?preset=makemore")
    page = w.page
    page.fill("#pt-steps", "6")
    page.click("#train-start")
    page.wait_for_function("() => document.getElementById('train-panel').dataset.state === 'done'")
    assert page.locator("#samples li").count() == 20
    edit(w, "backward", MAKEMORE["backward"].replace(TANH_RIGHT, TANH_WRONG))
    page.click("#train-start")
    page.wait_for_function(
        "() => document.getElementById('train-curves').dataset.runs === '2'"
        " && document.getElementById('train-panel').dataset.state === 'done'"
    )
    names = page.evaluate("() => document.getElementById('train-curves').data.map(t => t.name)")
    assert len(names) == 4
    assert names[0].startswith("#1 train · all gradients match")
    assert names[2].startswith("#2 train · dhpreact wrong") or "hpreact wrong" in names[2]
    points = page.evaluate("() => document.getElementById('train-curves').data[2].x.length")
    assert points >= 2
    assert w.errors == []


@pytest.mark.browser
def test_a_failing_row_says_why_from_the_diagnosis(watched):
    w = watched
    open_program(w, "?preset=makemore")
    page = w.page
    edit(w, "backward", MAKEMORE["backward"].replace(
        "dbnmeani = -dbndiff.sum(0, keepdim=True)", "dbnmeani = -dbndiff.mean(0, keepdim=True)"))  # fmt: skip
    assert verdict(w) == "fail"
    why = page.locator("#checks tr.why.st-first")
    assert why.get_attribute("data-kind") == "scale"
    text = why.inner_text()
    assert "dbnmeani is autograd's gradient times 1/n (n = 32)" in text and "G / R" in text
    # the gradients computed from it say so by their state, not by a sentence of their own
    assert page.locator("#checks tr.why").count() == 1
    assert w.errors == [] and w.foreign() == []
