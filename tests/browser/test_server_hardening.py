"""The page and /docs under the server's CSP, and the page waiting its turn on a busy server
(issue 13), in a real browser against `python -m app`."""

import pytest

pytestmark = pytest.mark.fresh_page  # each test adds an init script or a route to its tab

LISTEN = """document.addEventListener('securitypolicyviolation',
    e => (window.__csp = window.__csp || []).push(e.violatedDirective + ' ' + e.blockedURI));"""


@pytest.mark.browser
@pytest.mark.parametrize("path, ready", [("/", None), ("/docs", ".opblock")])
def test_page_and_docs_work_under_the_csp(watched, path, ready):
    w = watched
    w.page.add_init_script(LISTEN)
    w.page.goto(w.base + path)
    if ready is None:
        w.wait_drawn()
        assert w.page.locator(".heatmap-card .chart .main-svg").count() > 0
    else:
        w.page.wait_for_selector(ready)
        assert w.page.locator(".opblock").count() >= 3  # the routes, rendered by Swagger UI
    csp = w.page.evaluate("() => window.__csp || []")
    assert csp == [], csp
    assert [e for e in w.errors if "Content Security Policy" in e] == []
    assert w.errors == [], w.errors
    assert w.foreign() == []


@pytest.mark.browser
def test_the_page_waits_its_turn_after_a_503(watched):
    """The first /api/run answers 503 with Retry-After: 1 (a busy server): the page shows a
    queued state, asks again after a second, and draws."""
    w = watched
    calls = []

    def busy_once(route):
        calls.append(route.request.url)
        if len(calls) == 1:
            route.fulfill(
                status=503,
                headers={"Retry-After": "1", "content-type": "application/json"},
                body='{"detail": "the server is busy"}',
            )
        else:
            route.continue_()

    w.page.route("**/api/run", busy_once)
    w.page.goto(w.base + "/?batch=8&in_features=6&hidden=4,3")
    # read in the same frame as the queued state shows (it lasts about a second)
    label, shown = w.page.wait_for_function(
        "() => document.body.dataset.queued !== undefined"
        " && [document.querySelector('#loading').innerText,"
        " !document.querySelector('#loading').hidden]",
        timeout=30_000,
    ).json_value()
    assert "Queued" in label and shown
    w.wait_drawn()
    assert len(calls) == 2
    assert "queued" not in w.page.evaluate("() => Object.keys(document.body.dataset)")
    assert "Running" in w.page.evaluate("() => document.querySelector('#loading').textContent")
    assert w.page.locator("#run-error").is_hidden()
    assert w.page.locator(".heatmap-card .chart .main-svg").count() > 0
    assert w.errors == [] or all("503" in e for e in w.errors), w.errors
