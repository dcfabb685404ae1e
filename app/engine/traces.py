"""A run's traces from shapes alone (the learner's formulas dry-run on meta tensors), cached:
what admission (app/cost) costs and what the run (app/runs/pipeline.py) shows."""

from __future__ import annotations

import pickle
import threading
from collections import OrderedDict
from collections.abc import Hashable
from types import SimpleNamespace
from typing import Any

import torch

from app.engine.network import Network
from app.engine.tensors import DTYPES, input_specs
from app.lab.formulas import bind

SHAPE_FIELDS = ("in_features", "out_features", "activation", "norm", "loss", "dtype")


class TraceCache:
    """The traces of recent configs, least recently used first out, bounded by the bytes they
    hold (not by their count: a trace of 42 long formulas holds ~3 MB of dicts, the article's
    a few KB).

    Each trace is kept pickled: the cache's bytes are then exactly what `len` says, and it
    holds no object the cycle collector must walk (256 traces kept as dicts were 5.5 M
    objects, and every full collection walked them for 2 s). Each `get` gives fresh objects,
    which a caller may keep or change."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any:
        with self._lock:
            blob = self._items.get(key)
            if blob is None:
                return None
            self._items.move_to_end(key)
        return pickle.loads(blob)

    def put(self, key: Hashable, value: Any) -> None:
        blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        if len(blob) > self.max_bytes:
            return  # never kept (it would push out everything else)
        with self._lock:
            old = self._items.pop(key, None)
            self.bytes += len(blob) - (len(old) if old is not None else 0)
            self._items[key] = blob
            while self.bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= len(dropped)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)


# Pickled, a trace takes about a sixth of its size as dicts (42 long formulas: 0.5 MB)
TRACE_CACHE_BYTES = 48 << 20
_traces = TraceCache(TRACE_CACHE_BYTES)


def _dry_run(
    batch: int | tuple[int, ...], hidden: tuple[int, ...], formulas: tuple, fields: dict
) -> tuple:
    cfg = SimpleNamespace(batch=batch, hidden=list(hidden), **fields)
    net = Network.from_config(cfg)
    specs = input_specs(cfg)
    dtype = DTYPES[cfg.dtype]
    shapes = {s.name: s.shape for s in specs}
    dtypes = {s.name: torch.int64 if s.integer else dtype for s in specs}
    return net.trace(shapes, dtypes, bind(dict(formulas), net.grad_order))


def trace(cfg) -> tuple[list[dict], list[dict]]:
    """The forward and backward traces, from shapes alone (cached per shape config and
    formulas, by bytes: `TraceCache`). The learner's formulas are dry-run here: FormulaError
    or UnknownGradient if one cannot run (`app.lab.formulas.refuse` makes that a 422)."""
    batch = cfg.batch if isinstance(cfg.batch, int) else tuple(cfg.batch)
    fields = {name: getattr(cfg, name) for name in SHAPE_FIELDS}
    formulas = tuple(sorted(learner_sources(cfg).items()))
    key = (batch, tuple(cfg.hidden), formulas, tuple(fields.items()))
    found = _traces.get(key)
    if found is not None:
        return found
    traced = _dry_run(batch, tuple(cfg.hidden), formulas, fields)
    _traces.put(key, traced)
    return traced


def learner_sources(cfg) -> dict[str, str]:
    return dict(getattr(cfg, "formulas", None) or {})
