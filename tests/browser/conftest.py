"""Browser-test fixtures: a real uvicorn server on a free loopback port, and Debian's Chromium
driven by Playwright (never `playwright install`)."""

import os
import warnings
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("BROADPROP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[2]


REQUIRE_BROWSER = os.environ.get("BROADPROP_REQUIRE_BROWSER") == "1"  # set by scripts/test


def _missing(what: str) -> None:
    """A missing browser dependency fails the run under scripts/test (it must never read as a
    pass); an ad-hoc run skips, loudly."""
    message = (
        f"BROWSER TESTS NOT RUN: {what}. Install it (./scripts/test installs Debian's "
        "chromium and the dev extra's playwright) or set BROADPROP_CHROMIUM."
    )
    if REQUIRE_BROWSER:
        pytest.fail(f"{message} (BROADPROP_REQUIRE_BROWSER=1)", pytrace=False)
    warnings.warn(message, stacklevel=2)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    """One Chromium per module. Not per session: while Playwright's sync API is open it keeps
    an asyncio loop running on the main thread, and a later module on the same pytest-xdist
    worker that calls asyncio.run (or starts Playwright itself) would fail."""
    if not Path(CHROMIUM).exists():
        _missing(f"no Chromium at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        _missing(f"playwright is not importable ({e})")

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Watched:
    """A page plus everything it asked for and every console error or page error it raised."""

    def __init__(self, page, base: str):
        self.page = page
        self.base = base
        self.requests: list[str] = []
        self.errors: list[str] = []
        self._listeners = [
            ("request", lambda r: self.requests.append(r.url)),
            ("console", lambda m: m.type == "error" and self.errors.append(m.text)),
            ("pageerror", lambda e: self.errors.append(str(e))),
        ]
        for event, listener in self._listeners:
            page.on(event, listener)

    def detach(self) -> None:
        """Stop recording (the page goes on to another test)."""
        for event, listener in self._listeners:
            self.page.remove_listener(event, listener)

    def open(self, query: str = "") -> None:
        self.page.goto(f"{self.base}/{query}")
        self.wait_drawn()

    def wait_drawn(self) -> None:
        """Until a run has been drawn, nothing is in flight, and every chart is drawn (the
        page draws charts off screen when idle: body[data-pending-all])."""
        self.page.wait_for_function(  # a function, not an expression: the CSP forbids eval
            "() => ['ready', 'empty'].includes(document.body.dataset.state)"
            " && document.querySelector('#loading').hidden"
            " && (document.body.dataset.pendingAll || '0') === '0'",
            timeout=60_000,
        )

    def foreign(self) -> list[str]:
        return [
            u for u in self.requests if not (u.startswith(self.base + "/") or u.startswith("data:"))
        ]


@pytest.fixture(scope="module")
def shared_context(browser, server):
    """One browser context for a module's `watched` pages (the page stores nothing: no
    cookies, no web storage)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    # Anything bound elsewhere is refused (and recorded), so a stray request cannot hang a test.
    context.route(lambda url: not url.startswith(server + "/"), lambda route: route.abort())
    context.set_default_timeout(60_000)  # the machine is shared; a slow run is not a failure
    yield context
    context.close()


@pytest.fixture(scope="module")
def _kept_page() -> dict:
    return {}


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        item.stash[_FAILED] = True  # the `watched` fixture replaces the tab
    return report


@pytest.fixture
def watched(request, shared_context, server, _kept_page):
    """A page in the module's context, recorded while the test runs. The module's tests
    share one tab, each opening its own URL in it: a navigation within the site keeps the
    renderer and its compiled scripts (Plotly's among them), where a new tab starts both anew
    (about 0.6 s more a page). A test that changes the tab itself (a route, an init script, a
    dialog or request handler of its own) is marked `fresh_page` and gets a tab of its own;
    after a failure the tab is replaced."""
    fresh = request.node.get_closest_marker("fresh_page") is not None
    page = None if fresh else _kept_page.pop("page", None)
    if page is None or page.is_closed():
        page = shared_context.new_page()
    w = Watched(page, server)
    yield w
    if fresh or request.node.stash.get(_FAILED, False):
        page.close()
        return
    # End the test's document within the site (its late answers and console messages end
    # with it, recorded here, not in the next test), where the renderer stays.
    page.goto(f"{server}/healthz")
    page.mouse.move(0, 0)  # no hover carried into the next test
    w.detach()
    _kept_page["page"] = page
