"""The trace cache is bounded by bytes and holds nothing the cycle collector walks; memory is
given back without a full collection (issue 25, item 5)."""

from __future__ import annotations

import gc

from app.engine import traces
from app.engine.traces import TraceCache
from app.runs import pipeline
from app.sandbox import allocator
from app.schemas import RunRequest


def test_the_cache_is_bounded_by_bytes_least_recent_first_out():
    cache = TraceCache(max_bytes=10_000)
    for i in range(40):
        cache.put(i, [f"{i:02d}" * 500])  # about 1 KB pickled each
        assert cache.bytes <= 10_000
    assert 5 <= len(cache) < 40
    assert cache.get(0) is None  # the oldest went first
    assert cache.get(39) == ["39" * 500]
    kept = [i for i in range(40) if cache.get(i) is not None]
    assert kept == list(range(40 - len(kept), 40))


def test_a_used_entry_stays_and_an_entry_over_the_bound_is_never_kept():
    cache = TraceCache(max_bytes=5_000)
    cache.put("a", "a" * 1000)
    for i in range(10):
        cache.get("a")  # used between every put: the most recent
        cache.put(i, "b" * 1000)
    assert cache.get("a") == "a" * 1000
    cache.put("huge", "c" * 10_000)
    assert cache.get("huge") is None
    assert cache.get("a") == "a" * 1000


def test_each_get_gives_fresh_objects_and_the_cache_holds_only_bytes():
    cfg = RunRequest(batch=3, in_features=5, hidden=[4], formulas={"b1.g": "l1.g.sum(0)"})
    first = pipeline.trace(cfg)
    second = pipeline.trace(cfg)
    assert first == second and first is not second
    second[1][0]["code"] = "changed"
    assert pipeline.trace(cfg) == first
    assert traces._traces.bytes <= traces.TRACE_CACHE_BYTES
    held = list(traces._traces._items.values())
    assert held and all(isinstance(b, bytes) and not gc.is_tracked(b) for b in held)


def test_release_memory_never_runs_a_full_collection(monkeypatch):
    generations = []
    monkeypatch.setattr(
        allocator.gc, "collect", lambda generation=2: generations.append(generation)
    )
    if allocator.release_memory():  # False on a C library without malloc_trim
        assert generations and max(generations) < 2


def test_startup_freezes_what_is_alive(client):
    # the lifespan ran (the session's client): startup's objects are out of the collector's
    # reach, so a full collection walks only what came after
    assert gc.get_freeze_count() > 0
