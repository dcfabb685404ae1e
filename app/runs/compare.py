"""The fast.ai lesson in numbers: the same gradients by every strategy, and by autograd, with
the time and the peak extra memory each takes."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from app.check.autograd import autograd_gradients
from app.engine.memory import PeakMemory
from app.engine.network import Network
from app.ops import Context

STRATEGIES = ("broadcast", "einsum", "matmul")
REPEATS = 3  # best of: the machine is shared and noisy
SLOW_S = 0.25


def _cost(fn: Callable[[], Mapping[str, torch.Tensor]], manual: Mapping[str, torch.Tensor]) -> dict:
    with PeakMemory() as memory:
        grads = fn()
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        if best > SLOW_S:  # one timing is enough when it is this long (and bounds the work)
            break
    diff = max((grads[n] - manual[n]).abs().max().item() for n in grads if n in manual)
    return {"backward_ms": best * 1e3, "peak_extra_bytes": memory.peak_bytes, "max_abs_diff": diff}


def compare_strategies(
    cfg,
    net: Network,
    env: Mapping[str, torch.Tensor],
    tensors: Mapping[str, torch.Tensor],
    manual: Mapping[str, torch.Tensor],
    backward_trace: list[dict[str, Any]],
    chunk_bytes: int,
    cancel=None,
) -> dict[str, Any]:
    leaves = {n: manual[n] for n in tensors if n != "target"}
    rows = {
        strategy: _cost(
            lambda s=strategy: net.backward(env, Context(s, chunk_bytes, cancel=cancel)), leaves
        )
        for strategy in STRATEGIES
    }
    Context(cancel=cancel).check()
    rows["autograd"] = _cost(lambda: autograd_gradients(cfg, tensors), leaves)
    literal = max((s["bytes"] for e in backward_trace for s in e["steps"]), default=0)
    return {"strategies": rows, "literal_broadcast_bytes": literal, "chunk_bytes": chunk_bytes}
