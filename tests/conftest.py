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


def pytest_collection_modifyitems(config, items):
    """Browser tests and load tests are `slow`: `-m "not slow"` is the fast lane.

    Under pytest-xdist (`--dist loadgroup`, as ./scripts/test runs), a module's tests stay on
    one worker, so its module-scoped app and server start once; the load tests, which measure
    a server from outside, share one group and so never run beside each other."""
    for item in items:
        is_load = item.get_closest_marker("load") is not None
        if "browser" in item.keywords or is_load:
            item.add_marker(pytest.mark.slow)
        group = "load" if is_load else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))


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
