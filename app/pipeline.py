"""One run, end to end: config -> tensors -> forward -> manual backward -> check -> views."""

from __future__ import annotations

import time
from functools import lru_cache
from types import SimpleNamespace
from typing import Any

import torch

from app import budget
from app.check import autograd_gradients, cast_floats, check_against, recheck_rounding
from app.compare import compare_strategies
from app.fd import finite_difference_check
from app.network import Network
from app.ops import Context
from app.tensors import DTYPES, input_specs, make_tensors
from app.views import gradient_view, heatmap_cap, overflow_warnings

SHAPE_FIELDS = ("in_features", "out_features", "activation", "norm", "loss", "dtype")


@lru_cache(maxsize=256)
def _cached_trace(batch: int | tuple[int, ...], hidden: tuple[int, ...], **fields) -> tuple:
    cfg = SimpleNamespace(batch=batch, hidden=list(hidden), **fields)
    net = Network.from_config(cfg)
    specs = input_specs(cfg)
    dtype = DTYPES[cfg.dtype]
    shapes = {s.name: s.shape for s in specs}
    dtypes = {s.name: torch.int64 if s.integer else dtype for s in specs}
    return net.trace(shapes, dtypes)


def trace(cfg) -> tuple[list[dict], list[dict]]:
    """The forward and backward traces, from shapes alone (cached per shape config)."""
    batch = cfg.batch if isinstance(cfg.batch, int) else tuple(cfg.batch)
    fields = {name: getattr(cfg, name) for name in SHAPE_FIELDS}
    return _cached_trace(batch, tuple(cfg.hidden), **fields)


def estimate(cfg, chunk_bytes: int) -> budget.Estimate:
    forward, backward = trace(cfg)
    return budget.estimate(cfg, forward, backward, chunk_bytes)


def run(cfg, chunk_bytes: int, cancel=None) -> dict[str, Any]:
    """`cancel`: a token (anything with `is_set()`) checked between ops and chunks; once set,
    the run raises app.ops.base.RunCancelled there."""
    forward_trace, backward_trace = trace(cfg)
    net = Network.from_config(cfg)

    start = time.perf_counter()
    tensors = make_tensors(cfg)
    ctx = Context(strategy=cfg.strategy, chunk_bytes=chunk_bytes, cancel=cancel)
    env = net.forward(tensors, ctx)
    after_forward = time.perf_counter()
    grads = net.backward(env, ctx)
    after_backward = time.perf_counter()

    other_precision: dict[torch.dtype, dict[str, torch.Tensor]] = {}

    def manual_at(dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The same formulas on the tensors in another precision, computed once each."""
        if dtype not in other_precision:
            other_precision[dtype] = net.backward(
                net.forward(cast_floats(tensors, dtype), ctx), ctx
            )
        return other_precision[dtype]

    inter: dict[str, torch.Tensor] = {}
    reference = autograd_gradients(cfg, tensors, inter)
    ctx.check()
    check = check_against(cfg, grads, reference, inter)
    check = recheck_rounding(cfg, tensors, grads, reference, inter, check, manual_at)
    ctx.check()
    if cfg.fd_samples > 0:  # cost bounded before the run (budget.refuse_too_much_work)
        noise = {n: c.get("rounding_noise", 0.0) for n, c in check["tensors"].items()}
        if tensors["x"].dtype == torch.float32:
            # float64 differences judge a float32 gradient: measure its own rounding (the
            # same formulas in float64) rather than guess it
            grads64 = manual_at(torch.float64)
            for n in noise:
                noise[n] = max(noise[n], (grads[n].double() - grads64[n]).abs().max().item())
        check["finite_difference"] = finite_difference_check(cfg, tensors, grads, noise, ctx.check)
    after_check = time.perf_counter()
    ctx.check()

    specs = input_specs(cfg)
    info = {s.name: _info(env[s.name], s.role) for s in specs}
    for entry in forward_trace:
        role = "output" if entry["output"] in ("out", "loss") else "activation"
        info[entry["output"]] = _info(env[entry["output"]], role)
    leaves = [s.name for s in specs if s.role != "target"]
    cells = heatmap_cap(cfg)  # max_cells, or fewer where the response would pass its bound
    result = {
        "config": cfg.model_dump(),
        "loss": env["loss"].item(),
        "tensors": info,
        "forward": forward_trace,
        "backward": backward_trace,
        "gradients": {
            n: gradient_view(grads[n], cells, reference[n] if cfg.reference_heatmaps else None)
            for n in leaves
        },
        "check": check,
        "timing": {
            "forward_ms": (after_forward - start) * 1e3,
            "backward_ms": (after_backward - after_forward) * 1e3,
            "check_ms": (after_check - after_backward) * 1e3,
        },
    }
    if cfg.compare:
        ctx.check()
        result["compare"] = compare_strategies(
            cfg, net, env, tensors, grads, backward_trace, chunk_bytes, cancel
        )
    result["warnings"] = overflow_warnings(result)
    return result


def _info(t: torch.Tensor, role: str) -> dict[str, Any]:
    return {"shape": list(t.shape), "role": role, "bytes": t.numel() * t.element_size()}
