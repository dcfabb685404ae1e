"""Shared fixtures: a TestClient on a fresh app, and the article's reference computation."""

from __future__ import annotations

import os

import pytest
import torch
from fastapi.testclient import TestClient

# The run deadline counts the run's CPU time (with 4x it of wall time as a safety net): a
# run on a shared test machine could still miss the wall-clock net under load, and a slow
# debug build could miss the CPU bound. Tests of the deadline set their own.
os.environ.setdefault("BROADPROP_RUN_DEADLINE_S", "600")

from app.main import create_app  # noqa: E402  (after the environment it reads)
from app.ops import meta_kernels  # noqa: E402
from app.settings import Settings  # noqa: E402


def pytest_configure(config):
    # as the server and its workers do: every test dry-runs on the same meta kernels
    meta_kernels.use_native()
    config.addinivalue_line("markers", "xdist_group(name): run on one pytest-xdist worker")
    config.addinivalue_line(
        "markers",
        "app_settings(raise_server_exceptions=True, **settings): the `client` fixture of this "
        "module serves an app made with these Settings",
    )
    config.addinivalue_line(
        "markers",
        "fresh_page: the `watched` fixture gives this test a browser tab of its own (a test "
        "that adds a route, an init script or a handler to the tab)",
    )
    # xdist hands out groups by their test count unless told not to: a module of 169 quick
    # tests would go before a browser module of 6 slow ones, and a long one would come last
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    if getattr(config.option, "loadgroup", False):  # set on an xdist worker
        config.pluginmanager.register(_GroupSuffix(), "broadprop-xdist-group-suffix")


def _heavy_first(item) -> int:
    """A group's place in the queue: the long groups first (the load group, then the browser
    and notebook modules), so that the two workers never end on one long group each."""
    if item.get_closest_marker("load") is not None:
        return 0
    if "browser" in item.keywords or "notebook" in item.keywords:
        return 1
    return 2


class _GroupSuffix:
    """pytest-xdist's worker names an item's group by appending "@group" to its node id, in
    its own pytest_collection_modifyitems, through the attribute pytest before 9.2 kept the
    id in (`_nodeid`). pytest 9.2 keeps a structured id (`_id`), so the suffix is lost and
    every test is scheduled on its own: modules split over both workers, their module-scoped
    servers and browsers started twice, and the load group no longer alone
    (pytest-dev/pytest-xdist#1386). After xdist's hook, this adds the suffix where it is
    missing."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        if not config.getvalue("loadgroup"):
            return
        for item in items:
            mark = item.get_closest_marker("xdist_group")
            if mark is None or "@" in item.nodeid.rsplit("]", 1)[-1] or not hasattr(item, "_id"):
                continue
            from _pytest.nodeid import NodeId

            group = mark.args[0] if mark.args else mark.kwargs.get("name", "default")
            item._id = NodeId.parse(f"{item.nodeid}@{group}")


# tryfirst: the group must be marked before pytest-xdist's worker reads the marks
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Browser tests and load tests are `slow`: `-m "not slow"` is the fast lane.

    Under pytest-xdist (`--dist loadgroup`, as ./scripts/test runs), a module's tests stay on
    one worker, so its module-scoped app and server start once; the load tests, which measure
    a server from outside, share one group and so never run beside each other. The groups
    are handed out in the items' order (pytest_configure turns off xdist's reordering by
    test count), long ones first."""
    for item in items:
        is_load = item.get_closest_marker("load") is not None
        if "browser" in item.keywords or is_load:
            item.add_marker(pytest.mark.slow)
        group = "load" if is_load else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=_heavy_first)  # stable: within a class, the collection's order


@pytest.fixture(scope="session")
def server() -> str:
    """Base URL of a live `python -m app` (tests/servers.py) with the default settings but
    one torch thread a run, started once per test process and shared by the browser tests
    and any test that only needs a server as served: two OpenMP threads per run, beside the
    other test process and a browser on two cores, spin more than they compute (a 2-second
    training takes a minute)."""
    from tests.servers import LiveServer

    live = LiveServer(BROADPROP_TORCH_THREADS="1")
    yield live.base
    live.stop()


@pytest.fixture(scope="session")
def _default_client() -> TestClient:
    with TestClient(create_app()) as c:
        yield c


@pytest.fixture(scope="module")
def client(request) -> TestClient:
    """The one TestClient fixture. By default one app for the whole session; a module that
    needs other settings says so once, `pytestmark = pytest.mark.app_settings(...)`, and gets
    an app of its own (torch's thread count, which an app's lifespan sets, given back)."""
    marker = request.node.get_closest_marker("app_settings")
    if marker is None:
        yield request.getfixturevalue("_default_client")
        return
    settings = dict(marker.kwargs)
    raise_errors = settings.pop("raise_server_exceptions", True)
    base_url = settings.pop("base_url", "http://testserver")
    threads = torch.get_num_threads()
    try:
        app = create_app(Settings(**settings))
        with TestClient(app, raise_server_exceptions=raise_errors, base_url=base_url) as c:
            yield c
    finally:
        torch.set_num_threads(threads)


def article_reference(seed: int = 0, batch: int = 1000, n_in: int = 784, n_hidden: int = 50):
    """The article's script, written out independently of app/: tensors made as docs/API.md says,
    forward with torch ops, gradients by loss.backward()."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n_in, generator=g)
    target = torch.randn(batch, generator=g)
    w1 = torch.randn(n_in, n_hidden, generator=g)
    b1 = torch.randn(n_hidden, generator=g)
    w2 = torch.randn(n_hidden, 1, generator=g)
    b2 = torch.randn(1, generator=g)
    leaves = {
        n: t.clone().requires_grad_() for n, t in dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2).items()
    }
    l1 = leaves["x"] @ leaves["w1"] + leaves["b1"]
    out = torch.relu(l1) @ leaves["w2"] + leaves["b2"]
    loss = (out.squeeze(-1) - target).pow(2).mean()
    loss.backward()
    return loss.item(), {n: t.grad for n, t in leaves.items()}


class OpCount:
    """Every op a learner's formula makes (app.ops.traced.Traced._make: on meta tensors in
    the dry run, on real ones in the run), counted while the fixture lives: the work a
    request did, a count that a loaded machine cannot change (tests assert it, never times)."""

    def __init__(self) -> None:
        self.ops = 0
        self.real = 0  # of which on real tensors (the run's, not the dry run's)

    def take(self, real: bool = False) -> int:
        """The ops (`real`: on real tensors only) since the last `take`; both counts back
        to 0."""
        ops = self.real if real else self.ops
        self.ops = self.real = 0
        return ops


@pytest.fixture
def op_count(monkeypatch) -> OpCount:
    from app.ops.traced import Traced

    count = OpCount()
    make = Traced._make

    def counted(self, t, *args, **kwargs):
        count.ops += 1
        count.real += not t.is_meta
        return make(self, t, *args, **kwargs)

    monkeypatch.setattr(Traced, "_make", counted)
    return count


@pytest.fixture
def with_spare():
    """This thread's runs with a spare thread attached (app/ops/spare.py), for the test."""
    from app.ops import spare

    helper = spare.Spare("test-spare")
    spare.attach(helper)
    yield helper
    spare.attach(None)
