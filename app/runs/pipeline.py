"""One run, end to end: config -> tensors -> forward -> manual backward -> check -> views."""

from __future__ import annotations

import ast
import math
import time
from typing import Any

import torch

from app.check.autograd import (
    autograd_gradients,
    cancelling_scale,
    cast_floats,
    check_against,
    recheck_rounding,
)
from app.check.diagnosis import diagnose_check
from app.check.fd import finite_difference_check
from app.check.recheck import recheck_of
from app.check.suspect import mark_suspects
from app.cost.plan import heatmap_cap
from app.engine import data
from app.engine.follow import follow
from app.engine.network import Network
from app.engine.tensors import data_name, input_specs, lead_shape, make_tensors
from app.engine.traces import learner_sources, trace
from app.lab.formulas import LearnerFormula, bind
from app.ops import Context, spare
from app.ops.cancel import cancel_token
from app.runs.compare import compare_strategies
from app.schemas import MAX_FOLLOW_TERMS
from app.views.heatmap import (
    HEATMAP_KEYS,
    MAX_IMAGES,
    at_precision_all,
    data_view,
    gradient_view,
    overflow_warnings,
    small_values,
)

Traces = tuple[list[dict], list[dict]]  # the forward and backward traces (app.engine.traces)


def learner_formulas(cfg, net: Network) -> dict[str, LearnerFormula]:
    """The learner's formulas bound to `net`, for Network.backward (already dry-run by
    `trace`)."""
    return bind(learner_sources(cfg), net.grad_order)


def run(cfg, chunk_bytes: int, cancel=None, traces: Traces | None = None) -> dict[str, Any]:
    """`cancel`: a token (anything with `is_set()`) checked between ops and chunks, and after
    every op a learner's formula makes (`check_cancelled`); once set, the run raises
    app.ops.cancel.RunCancelled there. `traces`: the config's traces, as admission made them
    (made here when not given); the response holds them."""
    with cancel_token(cancel):
        return _run(cfg, chunk_bytes, cancel, traces or trace(cfg))


def _run(cfg, chunk_bytes: int, cancel, traces: Traces) -> dict[str, Any]:
    forward_trace, backward_trace = traces
    net = Network.from_config(cfg)

    start = time.perf_counter()
    tensors = make_tensors(cfg)
    # autograd's reference reads only the tensors: on the lane's spare core (if any), beside
    # the manual forward and backward
    inter: dict[str, torch.Tensor] = {}
    reference_made = spare.alongside(autograd_gradients, cfg, tensors, inter)
    ctx = Context(strategy=cfg.strategy, chunk_bytes=chunk_bytes, cancel=cancel)
    env = net.forward(tensors, ctx)
    after_forward = time.perf_counter()
    formulas = learner_formulas(cfg, net)
    # with the learner's formulas, the built-in gradients too: their error against autograd
    # is what rounding gives on this run, the measure of a suspect formula
    builtin: dict[str, torch.Tensor] | None = {} if formulas else None
    grads = net.backward(env, ctx, formulas, builtin)
    after_backward = time.perf_counter()
    specs = input_specs(cfg)
    leaves = [s.name for s in specs if s.role != "target"]
    cells = heatmap_cap(cfg)  # max_cells, or fewer where the response would pass its bound
    # the largest gradient's maps need nothing of the check unless autograd's are drawn
    # beside them: on the spare core (if any) while this thread checks
    largest = max(leaves, key=lambda n: grads[n].numel())
    drawn = (
        None if cfg.reference_heatmaps else spare.alongside(gradient_view, grads[largest], cells)
    )

    other_precision: dict[torch.dtype, dict[str, torch.Tensor]] = {}

    def manual_at(dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The same formulas on the tensors in another precision, computed once each."""
        if dtype not in other_precision:
            other_precision[dtype] = net.backward(
                net.forward(cast_floats(tensors, dtype), ctx), ctx, formulas
            )
        return other_precision[dtype]

    reference = reference_made.result()
    ctx.check()
    check = check_against(cfg, grads, reference, inter)
    recheck = recheck_of(cfg, forward_trace)  # the one rule, weighed from shapes
    check = recheck_rounding(cfg, tensors, grads, reference, inter, check, manual_at, recheck)
    ctx.check()
    check = mark_suspects(check, grads, builtin, reference, inter)
    check = _diagnose(
        cfg, net, formulas, tensors, env, check, grads, {**reference, **inter}, recheck
    )
    builtin = None  # freed before the finite differences
    if cfg.fd_samples > 0:  # cost bounded before the run (admission.refuse_too_much_work)
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
    followed = None
    if cfg.follow is not None:  # one slice of one broadcast product: about its terms' cost
        user = cfg.follow.grad in learner_sources(cfg)
        followed = follow(cfg.follow, net, env, grads, user, max_terms=MAX_FOLLOW_TERMS)
    after_follow = time.perf_counter()

    info = {s.name: _info(env[s.name], s.role) for s in specs}
    for entry in forward_trace:
        role = "output" if entry["output"] in ("out", "loss") else "activation"
        info[entry["output"]] = _info(env[entry["output"]], role)
    result = {
        # formulas only when given: the v1 config echo stays exactly as it was
        "config": _config_echo(cfg),
        "loss": env["loss"].item(),
        "tensors": info,
        "forward": forward_trace,
        "backward": backward_trace,
        "gradients": _views(cfg, leaves, grads, reference, check, cells, (largest, drawn)),
        "check": check,
        "formulas": {
            f"{e['grad']}.g": {
                k: e[k] for k in ("code", "steps", "shape", "bytes", "work", "flops")
            }
            for e in backward_trace
            if e["source"] == "user"
        },
        "timing": {
            "forward_ms": (after_forward - start) * 1e3,
            "backward_ms": (after_backward - after_forward) * 1e3,
            "check_ms": (after_check - after_backward) * 1e3,
        },
    }
    if followed is not None:
        result["follow"] = followed
        result["timing"]["follow_ms"] = (after_follow - after_check) * 1e3
    if cfg.compare:
        ctx.check()
        result["compare"] = compare_strategies(
            cfg, net, env, tensors, grads, backward_trace, chunk_bytes, cancel
        )
    if data_name(cfg) != "random":
        ds = data.load(cfg.data)
        first = min(MAX_IMAGES, math.prod(lead_shape(cfg.batch)))
        result["data"] = data_view(
            ds.name,
            ds.info.image_shape,
            ds.pixels[:first],
            ds.labels[:first],
            tensors["w1"],
            grads["w1"],
        )
    result["warnings"] = overflow_warnings(result)
    values = small_values(env, grads)
    if values is not None:
        result["values"] = values
    return result


def _views(cfg, leaves: list[str], grads, reference, check, cells: int,
           drawn: tuple[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Each gradient's stats and maps; the largest on the lane's spare core (if any) while
    this thread draws the others (x.g's maps are most of the views' time). `drawn`: the
    largest's name and its maps on their way (None: drawn here, with autograd's)."""

    def view(n: str) -> dict[str, Any]:
        return gradient_view(
            grads[n],
            cells,
            reference[n] if cfg.reference_heatmaps else None,
            _tolerance(check["tensors"].get(n)),
        )

    largest, aside = drawn
    if aside is None:
        aside = spare.alongside(view, largest)
    views = {n: view(n) for n in leaves if n != largest}
    views[largest] = aside.result()
    if cfg.reference_heatmaps:  # autograd's maps, the difference's and the tolerance's, drawn
        # for the eye (the page shows 4 digits): 5 significant digits, a third of the bytes
        # off the page's answer; the gradient's own map stays exact, as the contract says
        at_precision_all(list(views.values()), REFERENCE_DIGITS, keys=REFERENCE_MAPS)
    return {n: views[n] for n in leaves}  # in the leaves' order


REFERENCE_DIGITS = 5
REFERENCE_MAPS = tuple(key for key in HEATMAP_KEYS if key != "heatmap")  # autograd's and after


def _diagnose(
    cfg, net: Network, formulas, tensors, env, check, grads, reference, recheck: bool
) -> dict:
    """Why each failing gradient is wrong (app/check/diagnosis.py). A gradient reads what its
    learner's formula names (`l1.g`), or, built in, its consumer's output gradient; a float64
    run's `precision` compares with autograd in float32 (where the recheck's rule allows the
    other precision: `recheck`)."""
    reads: dict[str, set[str]] = {}
    for op in net.ops:
        for name in op.grad_inputs:
            reads.setdefault(name, set()).add(op.output)
    for name, formula in formulas.items():
        f = formula.formula
        nodes = [f.result, *(value for _, value in f.locals)]
        reads[name] = {n.value.id for node in nodes for n in ast.walk(node)
                       if isinstance(n, ast.Attribute) and n.attr == "g"
                       and isinstance(n.value, ast.Name)}  # fmt: skip
    floors = {n: cancelling_scale(cfg, n, reference) for n in check["tensors"]}
    sizes = tuple(sorted({int(d) for t in env.values() for d in t.shape if d > 1}))

    def lower() -> dict[str, torch.Tensor] | None:
        if tensors["x"].dtype != torch.float64 or not recheck:
            return None
        inter32: dict[str, torch.Tensor] = {}
        low = autograd_gradients(cfg, cast_floats(tensors, torch.float32), inter32)
        return {**low, **inter32}

    return diagnose_check(check, grads, reference, reads, sizes, floors, lower)


def _config_echo(cfg) -> dict[str, Any]:
    """The request with every default filled in; formulas and follow only when given, so the
    v1 echo stays exactly as it was."""
    config = cfg.model_dump(exclude={k for k in ("formulas", "follow") if not getattr(cfg, k)})
    if cfg.follow is not None:
        config["follow"] = cfg.follow.model_dump(exclude_none=True)
    return config


def _tolerance(c: dict[str, Any] | None) -> tuple[float, float] | None:
    """A gradient's (rtol, atol) from the check; None when autograd's is not finite."""
    return None if c is None or c.get("atol") is None else (c["rtol"], c["atol"])


def _info(t: torch.Tensor, role: str) -> dict[str, Any]:
    return {"shape": list(t.shape), "role": role, "bytes": t.numel() * t.element_size()}
