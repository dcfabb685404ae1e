"""Training with the manual gradients: SGD (+ momentum) over `Network.forward` / `backward`.

`train(cfg, ...)` is a generator of event dicts (`progress` every `eval_every` steps and at
the end, then one `done`); it knows nothing of HTTP. Every progress step's manual gradients
are also checked against autograd on the same minibatch. Deterministic per seed: the
weights are the run's (app.engine.tensors), the minibatches a seeded shuffle of the training part.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from app.check.autograd import autograd_gradients, cancelling_scale
from app.check.tolerance import compare
from app.engine import data
from app.engine.network import Network
from app.engine.tensors import data_name, examples, input_specs, make_tensors
from app.ops import Context
from app.ops.cancel import RunCancelled
from app.runs.loop import Cadence, Stop, finite_or_none, loop
from app.runs.pipeline import learner_formulas
from app.views.heatmap import gradient_view, unit_images

SHUFFLE_SEED_OFFSET = 1  # the shuffle's generator: seed + 1, apart from the weights' (seed)
MIN_EXAMPLES = 5  # so that the training and the validation parts are both non-empty


@dataclass(frozen=True)
class Split:
    """The data in the fixed order: the first n - n // 5 to train on, the last n // 5 held out."""

    x_train: torch.Tensor  # (n_train, in)
    t_train: torch.Tensor  # (n_train,) or (n_train, out)
    x_val: torch.Tensor  # (n_val, in)
    t_val: torch.Tensor


def split(cfg, tensors: dict[str, torch.Tensor]) -> Split:
    """Image data: the whole dataset. random: the run's own x and target (prod(batch)
    examples, leading dims flattened), so a random run trains on what /api/run shows."""
    if data_name(cfg) == "random":
        x = tensors["x"].reshape(-1, cfg.in_features)
        t = tensors["target"]
        t = t.reshape(-1) if t.ndim == tensors["x"].ndim - 1 else t.reshape(-1, t.shape[-1])
    else:
        x, t = examples(cfg)
    n_val = x.shape[0] // 5
    n_train = x.shape[0] - n_val
    return Split(x[:n_train], t[:n_train], x[n_train:], t[n_train:])


def n_examples(cfg) -> int:
    """How many examples the data has (image data: the dataset; random: prod(batch))."""
    if data_name(cfg) != "random":
        return data.INFO[cfg.data].n
    return math.prod([cfg.batch] if isinstance(cfg.batch, int) else cfg.batch)


def minibatches(n: int, size: int, seed: int) -> Iterator[torch.Tensor]:
    """Indices of successive minibatches: each epoch a fresh seeded shuffle of range(n),
    cut into `size` pieces; a last piece shorter than `size` is dropped (every step sees a
    full minibatch, which batchnorm's statistics want)."""
    g = torch.Generator().manual_seed(seed + SHUFFLE_SEED_OFFSET)
    while True:
        order = torch.randperm(n, generator=g)
        for start in range(0, n - size + 1, size):
            yield order[start : start + size]


class SGD:
    """torch.optim.SGD's update (no dampening, no weight decay), written out:
    v = momentum * v + g (v = g at the first step); p -= lr * v."""

    def __init__(self, params: dict[str, torch.Tensor], lr: float, momentum: float):
        self.params, self.lr, self.momentum = params, lr, momentum
        self.velocity: dict[str, torch.Tensor] = {}

    def step(self, grads: dict[str, torch.Tensor]) -> None:
        for name, p in self.params.items():
            g = grads[name]
            if self.momentum:
                v = self.velocity.get(name)
                if v is None:
                    v = self.velocity[name] = g.clone()
                else:
                    v.mul_(self.momentum).add_(g)
                g = v
            p.add_(g, alpha=-self.lr)


def train(
    cfg,
    chunk_bytes: int,
    should_stop: Callable[[], bool] = lambda: False,
    time_limit_s: float | None = None,
    step_cancel: Callable[[], Any] | None = None,
    every_step: bool = False,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ("progress", {...}) every `eval_every` steps and after the last, then
    ("done", {...}). Stops early (the done event says why) when `should_stop()` turns true
    (checked every step), after `time_limit_s`, when the loss stops being finite, or when a
    step's cancel token (a fresh `step_cancel()` per step, checked between its ops and chunks:
    a per-step deadline) turns set ("step_deadline"). `every_step`: also yield
    ("step", {"step": n}) after every step with no progress event, so that a caller may
    pause between any two steps (the server gives its run slot back there). The loop is
    app/runs/loop.py's; `NetworkSteps` says what a step computes."""
    start = time.perf_counter()
    t = NetworkSteps(cfg, chunk_bytes, step_cancel, start)
    outcome = yield from loop(
        t,
        cfg.steps,
        start=start,
        report_every=cfg.eval_every,  # every report evaluates
        eval_every=cfg.eval_every,
        should_stop=should_stop,
        time_limit_s=time_limit_s,
        kind="progress",
        between=every_step,
    )
    yield "done", done(cfg, t.net, t.parts, t.params, t.w1_before, outcome.steps,
                       outcome.stopped, start)  # fmt: skip


class NetworkSteps:
    """A Network's training steps (app/runs/loop.py's `Steps`): the manual forward and
    backward on a minibatch, SGD (+ momentum), and at each report the step's gradients
    checked against autograd (before the update) and the validation loss (after it)."""

    def __init__(self, cfg, chunk_bytes: int, step_cancel: Callable[[], Any] | None,
                 start: float):  # fmt: skip
        self.cfg, self.step_cancel, self.start = cfg, step_cancel, start
        tensors = make_tensors(cfg)
        names = [s.name for s in input_specs(cfg) if s.role == "param"]
        self.params = {n: tensors[n].clone() for n in names}  # updated in place
        self.w1_before = self.params["w1"].clone()
        self.parts = split(cfg, tensors)
        self.net = Network.from_config(cfg)
        # the manual backward with the request's strategy; training needs no x.g, and no
        # second formula (cross_entropy's fused form) for a gradient
        self.ctx = Context(cfg.strategy, chunk_bytes, variants=False, skip=frozenset({"x"}))
        # the learner's, replacing the built-in ones; not those of the gradients training
        # skips (x.g) unless another formula reads them
        self.formulas = needed_formulas(learner_formulas(cfg, self.net), self.ctx.skip)
        self.optimizer = SGD(self.params, cfg.lr, cfg.momentum)
        self.batches = minibatches(self.parts.x_train.shape[0], cfg.train_batch, cfg.seed)
        self.batch: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.checked: dict[str, Any] | None = None

    def step(self, number: int) -> float:
        idx = next(self.batches)
        self.batch = {"x": self.parts.x_train[idx], "target": self.parts.t_train[idx],
                      **self.params}  # fmt: skip
        self.ctx.cancel = self.step_cancel() if self.step_cancel is not None else None
        try:
            env = self.net.forward(self.batch, self.ctx)
            self.grads = self.net.backward(env, self.ctx, self.formulas)  # the manual gradients
        except RunCancelled:
            raise Stop("step_deadline") from None
        return env["loss"].item()

    def before_update(self, step: int, reporting: bool) -> None:
        # checked before the update: autograd sees the weights these gradients are for
        self.checked = check(self.cfg, self.batch, self.grads, self.params) if reporting else None

    def update(self) -> None:
        self.optimizer.step(self.grads)

    def report(self, cadence: Cadence, loss: float | None, batch_loss: float | None) -> dict:
        val_loss, accuracy = evaluate(self.net, self.parts, self.params, self.cfg)  # updated
        return {
            **(self.checked or {}),
            "step": cadence.step,
            "loss": loss,  # the mean over the steps since the last event
            "batch_loss": batch_loss,
            "val_loss": finite_or_none(val_loss),
            "val_accuracy": accuracy,
            "steps_per_s": cadence.step / (time.perf_counter() - self.start),
        }


GRAD_NAME = re.compile(r"\b([A-Za-z_]\w*)\.g\b")


def needed_formulas(formulas: dict[str, Any], skip: frozenset[str]) -> dict[str, Any]:
    """The learner's formulas without those for gradients nobody needs (`skip`: training's
    x.g), unless another formula reads that gradient."""
    read = {
        name
        for key, f in formulas.items()
        for name in GRAD_NAME.findall(f.formula.source)
        if key not in skip
    }
    return {k: f for k, f in formulas.items() if k not in skip or k in read}


def evaluate(net: Network, parts: Split, params: dict[str, torch.Tensor], cfg) -> tuple:
    """(validation loss, accuracy or None): the held-out part, forward only."""
    env = net.forward({"x": parts.x_val, "target": parts.t_val, **params})
    accuracy = None
    if cfg.loss == "cross_entropy":
        accuracy = (env["out"].argmax(-1) == parts.t_val).double().mean().item()
    return env["loss"].item(), accuracy


def check(cfg, batch, grads, params) -> dict[str, Any]:
    """The step's gradient norms, and its manual gradients against autograd on the same
    minibatch and weights; `overflow` when either side is not finite (a diverging run: then
    all_close is false for the numbers, not for the formulas)."""
    inter: dict[str, torch.Tensor] = {}
    reference = autograd_gradients(cfg, batch, inter)
    checks = {n: compare(grads[n], reference[n], cancelling_scale(cfg, n, inter)) for n in params}
    rel = [c["max_rel_err"] for c in checks.values()]
    # inf or NaN on either side: the numbers overflowed, which says nothing about the formulas
    finite = all(bool(t.isfinite().all()) for n in params for t in (grads[n], reference[n]))
    return {
        "grad_norms": {
            n: finite_or_none(torch.linalg.vector_norm(grads[n]).item()) for n in params
        },
        "max_rel_err": finite_or_none(max(rel)) if all(r is not None for r in rel) else None,
        "all_close": all(c["allclose"] for c in checks.values()),
        "overflow": not finite,
    }


def done(cfg, net, parts, params, w1_before, step, stopped, start) -> dict[str, Any]:
    """The end: how far it got, and the first layer's weights after (and before) training."""
    val_loss, accuracy = evaluate(net, parts, params, cfg)
    weights = {"w1": gradient_view(params["w1"], cfg.max_cells)}
    before = {"w1": gradient_view(w1_before, cfg.max_cells)}
    if data_name(cfg) != "random":
        info = data.INFO[cfg.data]
        for view, w in ((weights["w1"], params["w1"]), (before["w1"], w1_before)):
            view["image_shape"] = list(info.image_shape)
            view["images"] = unit_images(w)  # one image per unit (the first 64)
    return {
        "steps": step,
        "stopped": stopped,
        "val_loss": finite_or_none(val_loss),
        "val_accuracy": accuracy,
        "seconds": time.perf_counter() - start,
        "weights": weights,
        "weights_before": before,
    }
