"""Compare mode stops with its run: the strategies' backward passes see the run's cancel token."""

from __future__ import annotations

import threading

import pytest

from app.engine.network import Network
from app.engine.tensors import make_tensors
from app.ops import Context
from app.ops.cancel import RunCancelled
from app.runs import pipeline
from app.runs.compare import compare_strategies
from app.schemas import RunRequest


def test_a_cancelled_run_stops_inside_the_first_strategy():
    cfg = RunRequest(batch=8, in_features=6, hidden=[4], compare=True)
    tensors = make_tensors(cfg)
    net = Network.from_config(cfg)
    env = net.forward(tensors)
    grads = net.backward(env, Context())
    _, backward_trace = pipeline.trace(cfg)
    finished = []
    backward = net.backward

    def counted(*args, **kwargs):
        out = backward(*args, **kwargs)
        finished.append(args[1].strategy)
        return out

    net.backward = counted
    stopped = threading.Event()
    stopped.set()
    with pytest.raises(RunCancelled):
        compare_strategies(cfg, net, env, tensors, grads, backward_trace, 1 << 20, stopped)
    assert finished == []  # not one strategy ran to its end after the run was stopped
