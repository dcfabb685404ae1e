"""The Train panel and the image panel in a real browser: training runs with live curves,
Stop stops it (the server frees the run slot), and image data is drawn as images."""

from urllib.parse import quote

import pytest

DIGITS = "?data=digits&loss=cross_entropy&init=kaiming&hidden=16&batch=64"


def points(page) -> int:
    """Points drawn on the training-loss curve so far."""
    return page.evaluate("() => (document.getElementById('train-curves').data?.[0].x.length) ?? 0")


def state(page) -> str:
    return page.get_attribute("#train-panel", "data-state")


def start_training(page, steps: int, eval_every: int) -> None:
    page.fill("#t-steps", str(steps))
    page.fill("#t-eval_every", str(eval_every))
    page.click("#train-start")


@pytest.mark.browser
def test_the_train_panel_runs_the_curves_grow_and_stop_stops(watched):
    w = watched
    w.open(DIGITS)
    page = w.page
    start_training(page, steps=20000, eval_every=5)
    page.wait_for_function(
        "() => (document.getElementById('train-curves').data?.[0].x.length ?? 0) >= 3"
    )
    first = points(page)
    page.wait_for_function(  # a loaded machine may take a while between events
        f"() => document.getElementById('train-curves').data[0].x.length > {first}",
        timeout=180_000,
    )
    assert state(page) == "running"
    assert page.is_enabled("#train-stop") and not page.is_enabled("#train-start")
    assert "step " in page.inner_text("#train-status") and "ETA" in page.inner_text("#train-status")
    traces = page.evaluate("() => document.getElementById('train-curves').data.map(t => t.name)")
    assert traces == ["run 1: built-in", "run 1 validation loss", "run 1 validation accuracy"]

    page.click("#train-stop")
    page.wait_for_function(
        "() => document.getElementById('train-panel').dataset.state === 'stopped'"
    )
    assert page.inner_text("#train-status").startswith("Stopped at step")
    stopped_at = points(page)
    page.wait_for_timeout(1500)
    assert points(page) == stopped_at  # nothing more arrives
    assert page.is_enabled("#train-start") and not page.is_enabled("#train-stop")
    # the server let the slot go: the page can run again
    page.select_option("#f-activation", "tanh")
    w.wait_drawn()
    assert page.get_attribute("body", "data-state") == "ready"
    assert page.is_hidden("#run-error")  # not a 503: the one run slot is free again
    assert w.errors == [] and w.foreign() == []


@pytest.mark.browser
def test_a_short_training_ends_with_w1_before_and_after_as_images(watched):
    w = watched
    w.open(DIGITS)
    page = w.page
    start_training(page, steps=60, eval_every=20)
    page.wait_for_function("() => document.getElementById('train-panel').dataset.state === 'done'")
    assert points(page) == 4  # steps 1, 20, 40, 60
    assert page.inner_text("#train-status").startswith("Done: 60 steps")
    for chart in ("#train-w1-before", "#train-w1-after"):
        z = page.evaluate(f"() => document.querySelector('{chart}').data[0].z")
        assert len(z) == 2 * 8 + 1 and len(z[0]) == 10 * 8 + 9  # 16 units: 2 rows of 10 tiles
    assert w.errors == [] and w.foreign() == []


@pytest.mark.browser
def test_image_data_draws_the_digits_and_w1_per_unit(watched):
    w = watched
    w.open(DIGITS)
    page = w.page
    assert page.is_visible("#data-panel")
    labels = page.evaluate(
        "() => document.getElementById('data-digits').layout.annotations.map(a => a.text)"
    )
    assert len(labels) == 20 and all(t.isdigit() for t in labels)
    for chart in ("#data-w1", "#data-w1g"):
        assert page.evaluate(f"() => document.querySelector('{chart}').data[0].type") == "heatmap"
    w.open("?batch=8&in_features=6&hidden=4,3&seed=3")
    assert not page.is_visible("#data-panel")


@pytest.mark.browser
def test_a_bad_train_field_is_shown_at_the_field(watched):
    w = watched
    w.open(DIGITS)
    page = w.page
    page.fill("#t-momentum", "1.5")
    page.click("#train-start")
    page.wait_for_function("() => document.getElementById('terr-momentum').textContent !== ''")
    assert "1" in page.inner_text("#terr-momentum")
    assert state(page) == "error"


@pytest.mark.browser
def test_a_learners_wrong_formula_from_the_lab_visibly_fails_the_check(watched):
    """The lab keeps the learner's formulas in the URL; training uses them."""
    w = watched
    w.open(DIGITS + "&f.w1.g=" + quote("-(x.t() @ l1.g)"))
    page = w.page
    page.fill("#t-steps", "40")
    page.fill("#t-eval_every", "20")
    page.click("#train-start")
    page.wait_for_function("() => document.getElementById('train-panel').dataset.state === 'done'")
    assert "differed from autograd at 3 of the checked steps" in page.inner_text("#train-status")
    assert page.get_attribute("#train-panel", "data-differed") == "3"  # steps 1, 20, 40
    curve = page.evaluate("() => document.getElementById('train-curves').data[0].y")
    assert curve[-1] > curve[0] * 0.8  # the loss does not fall as it should


@pytest.mark.browser
def test_the_built_in_gradients_pass_every_check(watched):
    w = watched
    w.open(DIGITS)
    page = w.page
    page.fill("#t-steps", "40")
    page.click("#train-start")
    page.wait_for_function("() => document.getElementById('train-panel').dataset.state === 'done'")
    assert page.get_attribute("#train-panel", "data-differed") == "0"
    assert "differed" not in page.inner_text("#train-status")
