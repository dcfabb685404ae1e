"""One admission path (issue 23): a run is traced once, planned once (app/cost/plan.py), and
the rounding recheck is decided by one rule, the same for the costs and for the check."""

from __future__ import annotations

import pytest
import torch

from app.check import recheck as rule
from app.cost import plan as planning
from app.engine import traces
from app.engine.network import Network
from app.engine.tensors import make_tensors
from app.ops import Context
from app.schemas import RunRequest

SMALL = {"batch": 4, "in_features": 5, "hidden": [3], "max_cells": 64}


def test_the_check_uses_the_plans_recheck_rule():
    assert planning.gets_recheck is rule.gets_recheck
    cfg = RunRequest(**SMALL)
    forward, _ = traces.trace(cfg)
    assert planning.plan(cfg).held == rule.held_bytes(cfg, forward)


@pytest.mark.parametrize(
    "fields, recheck",
    [
        ({**SMALL}, True),  # float32, small
        ({"batch": 12000}, False),  # float32, 80 MB of tensors and gradients
        ({"dtype": "float64"}, True),
        ({**SMALL, "norm": "layernorm", "loss": "mse"}, True),
    ],
)
def test_the_plans_recheck_is_what_the_check_does(fields, recheck):
    """The one measure (app/check/recheck.py, from shapes) is exactly the bytes of the real
    tensors and manual gradients the recheck reruns."""
    cfg = RunRequest(**fields)
    run = planning.plan(cfg)
    net = Network.from_config(cfg)
    tensors = make_tensors(cfg)
    ctx = Context(strategy="matmul", chunk_bytes=4 << 20)
    grads = net.backward(net.forward(tensors, ctx), ctx, {}, None)
    held = sum(t.numel() * t.element_size() for t in [*tensors.values(), *grads.values()])
    assert run.held == held
    assert run.recheck == rule.gets_recheck(held) == rule.recheck_of(cfg, run.forward) == recheck


def test_the_plan_counts_the_rerun_of_the_learners_formulas():
    cfg = RunRequest(**SMALL, formulas={"x.g": "l1.g @ w1.T"})
    assert planning.plan(cfg).formula_passes == 2  # small: the recheck may rerun them
    big = planning.plan(RunRequest(batch=12000, formulas={"x.g": "l1.g @ w1.T"}))
    assert not big.recheck and big.formula_passes == 1
    assert planning.plan(big.cfg.model_copy(update={"fd_samples": 2})).formula_passes == 2


@pytest.mark.parametrize(
    "fields",
    [
        SMALL,
        {**SMALL, "formulas": {"x.g": "l1.g @ w1.T"}, "fd_samples": 2, "compare": True},
    ],
)
def test_one_trace_per_request(client, monkeypatch, fields):
    """Admission traces the config, and the run shows that same trace: every call of
    `app.engine.traces.trace` asks its cache once."""
    asked = []
    get = traces._traces.get

    def counted(key):
        asked.append(key)
        return get(key)

    monkeypatch.setattr(traces._traces, "get", counted)
    r = client.post("/api/run", json=fields)
    assert r.status_code == 200, r.text[:300]
    assert len(asked) == 1


def test_the_run_shows_the_trace_admission_made(client, monkeypatch):
    made = []
    dry_run = traces._dry_run

    def counted(*args):
        made.append(dry_run(*args))
        return made[-1]

    traces._traces.clear()
    monkeypatch.setattr(traces, "_dry_run", counted)
    body = {**SMALL, "batch": 7, "formulas": {"b1.g": "l1.g.sum(0)"}}
    r = client.post("/api/run", json=body)
    assert r.status_code == 200
    assert len(made) == 1
    assert r.json()["backward"] == made[0][1]
    assert torch.is_grad_enabled()
