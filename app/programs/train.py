"""Training a program with the learner's own backward: plain SGD over the inputs that have a
gradient, with the gradients the learner's backward wrote.

`train(setup, ...)` is a generator of ("step" | "done", payload) events; it knows nothing of
HTTP (app/api/program.py streams it). Each step runs the forward and the backward through the
same interpreters as `POST /api/program` (app.programs.plan.ForwardRun / BackwardRun), under
no_grad: no autograd anywhere, so a wrong backward trains as wrongly as it is written.

A names program (an input `{"data": "names", ...}`) trains on random minibatches of the names
data's training part (`names_data(..., draw=g)`), is validated on its val part, and is sampled
from (a sequence model's `logits` (B, T, V): the prediction after the last position). An image
program (`{"data": "mnist" | "digits", ...}`) trains on minibatches of its data's training part
the same way and is validated on the held-out part, with its accuracy when the forward names
its class scores `logits` or `scores`. Its batch size is its data inputs' `rows`; a plain-number input equal to those rows (the
program's `n`) is the batch size too, and changes with it. Any other program trains on its own
inputs, whole (the same batch every step), with no validation.

Sampling: the forward computes `logits` for a batch, and a batchnorm written out takes its
statistics from that batch. So names are drawn 20 at a time, their contexts stacked on top of
a fixed block of training contexts (SAMPLE_ROWS rows in all): the batch statistics are those
of real data, not of 20 copies of the start context. The forward runs up to the line that
assigns `logits`; the next character is drawn from softmax(logits) of each name's row.
"""

from __future__ import annotations

import ast
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from app.lab.statements import Program, ProgramError
from app.ops.cancel import RunCancelled
from app.ops.making import Maker
from app.ops.traced import Traced
from app.programs import run as programs
from app.programs.inputs import ALPHABET, DTYPES, data_fields, data_rows, make_inputs
from app.programs.plan import ForwardRun, Plan, ProgramRefused, detached
from app.programs.schemas import ProgramRequest
from app.runs.loop import Cadence, Failed, Stop, finite_or_none, loop

VAL_ROWS = 2000  # rows of the val part (and of a fixed train block) a loss is measured on
SAMPLE_ROWS = 256  # the sampling batch: the names being drawn plus training contexts
SAMPLES = 20  # names drawn at the end (10 at each evaluation)
MAX_NAME = 20  # characters a sampled name may reach before it is cut
LOGITS = "logits"
SCORES = ("logits", "scores")  # an image program's class scores (CS231n says scores): accuracy
DRAW_SEED_OFFSET = 1  # minibatches: manual_seed(seed + 1); samples: seed + 2


@dataclass
class Setup:
    """What a training needs, checked before the stream starts (every plan dry-run)."""

    program: ProgramRequest  # as sent: its inputs' seed makes the starting weights
    step: ProgramRequest  # the same program at the training batch size
    plan: Plan  # the step's dry run
    steps: int
    lr: float
    seed: int
    eval_every: int
    report_every: int
    names: DataTask | None  # a data program's task (names or digits); None: no data


@dataclass
class DataTask:
    """A data program (names or digits): where the data goes in, and the plans at the other
    batch sizes."""

    x_input: str
    y_input: str | None
    block_size: int
    val: ProgramRequest
    val_plan: Plan
    sample: ProgramRequest | None  # the program at SAMPLE_ROWS (names only)
    sample_forward: Program | None  # its forward up to `logits`; None: no line assigns it
    data: str = "names"  # "names", "mnist" or "digits"
    scores: str | None = None  # an image program's class scores, for its accuracy

    @property
    def images(self) -> bool:
        return self.data != "names"


def resized(req: ProgramRequest, rows: int) -> ProgramRequest:
    """The program at another batch size: every names-data input takes `rows` rows, and a
    plain-number input equal to the data's rows (the program's `n`) becomes `rows`."""
    data_rows = {s.rows for s in req.inputs.values() if s.data is not None}
    inputs = {}
    for name, spec in req.inputs.items():
        if spec.data is not None:
            spec = spec.model_copy(update={"rows": rows})
        elif type(spec.value) is int and spec.value in data_rows:
            spec = spec.model_copy(update={"value": rows})
        inputs[name] = spec
    return req.model_copy(update={"inputs": inputs})


def prepare(
    program: ProgramRequest,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    eval_every: int | None,
    report_every: int | None,
    admit: Callable[[ProgramRequest], Plan],
) -> Setup:
    """Every dry run a training needs (`admit` raises ProgramRefused: a 422)."""
    admit(program)
    data = {n: s for n, s in program.inputs.items() if s.data is not None}
    names = None
    step_req = program
    if data:
        step_req = resized(program, batch)
        x_input = next((n for n, s in data.items() if s.field == "X"), None)
        y_input = next((n for n, s in data.items() if s.field in ("Y", "Yseq")), None)
        first = data[x_input] if x_input else next(iter(data.values()))
        kind = first.data
        if any(s.data != kind for s in data.values()):
            raise ProgramRefused("inputs", None, "a training reads one data set: every data "
                                 "input names the same `data`", "data")  # fmt: skip
        # the val pass and sampling run the forward only: their dry runs skip the backward
        forward_only = program.model_copy(update={"backward": ""})
        val = resized(forward_only, min(VAL_ROWS, data_rows(kind, "val")))
        val_plan = admit(val)
        sample = sample_forward = None
        if x_input is not None and kind == "names":
            sample = resized(forward_only, SAMPLE_ROWS)
            sample_forward = _up_to(admit(sample).forward, LOGITS)
        scores = None
        if kind != "names":
            scores = next((n for n in SCORES if n in val_plan.intermediates), None)
        names = DataTask(x_input or "", y_input, first.block_size, val, val_plan, sample,
                         sample_forward, kind, scores)  # fmt: skip
    plan = admit(step_req)
    return Setup(
        program=program,
        step=step_req,
        plan=plan,
        steps=steps,
        lr=lr,
        seed=seed,
        eval_every=eval_every or min(100, max(5, steps // 10)),
        report_every=report_every or max(1, steps // 500),
        names=names,
    )


def _up_to(forward: Program, name: str) -> Program | None:
    """The forward's lines up to the one that assigns `name`: what sampling runs (it needs
    no targets). None when no line assigns it."""
    for i, stmt in enumerate(forward.body):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return Program(forward.which, forward.source, forward.body[: i + 1])
    return None


# --------------------------------------------------------------------------- running


def _scope(made: dict[str, Any], params: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The forward's inputs: parameters as they are now, everything else as made."""
    scope: dict[str, Any] = {}
    for name, value in made.items():
        value = params.get(name, value)
        scope[name] = Traced(value, name) if isinstance(value, torch.Tensor) else value
    return scope


def _forward(program: Program, scope: dict[str, Any], check: Callable[[], None],
             maker: Maker | None = None):  # fmt: skip
    fwd = ForwardRun(program, scope, check, maker=maker)
    with torch.no_grad():
        fwd.run()
    return fwd


class Trainer:
    def __init__(self, setup: Setup, check: Callable[[], None]):
        self.setup, self.check = setup, check
        req = setup.program
        self.dtype = DTYPES[req.dtype]
        made = make_inputs(req.inputs, req.seed, req.dtype)
        self.params = {
            n: v.clone() for n, v in made.items()
            if n in setup.plan.has_grad and isinstance(v, torch.Tensor)
        }  # fmt: skip
        self.base = make_inputs(setup.step.inputs, req.seed, req.dtype)  # the step's shapes
        self.draw = torch.Generator().manual_seed(setup.seed + DRAW_SEED_OFFSET)
        self.sampler = torch.Generator().manual_seed(setup.seed + DRAW_SEED_OFFSET + 1)
        # the program's own tensors (torch.zeros, dropout's masks): the run's dtype, fresh draws
        self.maker = Maker("cpu", self.dtype, torch.Generator().manual_seed(
            setup.seed + DRAW_SEED_OFFSET + 2))  # fmt: skip

    def minibatch(self) -> dict[str, Any]:
        names = self.setup.names
        made = dict(self.base)
        if names is not None:
            rows = self.setup.step.inputs[names.x_input or names.y_input].rows
            fields = data_fields(names.data, names.block_size, rows, self.setup.program.seed,
                                 "train", self.draw)  # fmt: skip
            self._put(made, self.setup.step, fields)
        return made

    def _put(self, made: dict[str, Any], req: ProgramRequest, fields: dict[str, torch.Tensor]):
        """The data inputs' tensors from one draw of every field (images in the run's dtype)."""
        for name, spec in req.inputs.items():
            if spec.data is not None:
                t = fields[spec.field]
                made[name] = t.to(self.dtype) if t.is_floating_point() else t

    def step(self) -> tuple[float, dict[str, torch.Tensor], ProgramError | None]:
        """One forward and the learner's backward: (loss, gradients written, error)."""
        plan = self.setup.plan
        fwd = _forward(plan.forward, _scope(self.minibatch(), self.params), self.check,
                       self.maker)  # fmt: skip
        loss = fwd.scope[self.setup.program.loss].t.item()
        env = {n: detached(v) for n, v in fwd.scope.items()}
        bwd, error = programs.run_backward(plan, env, self.check, self.maker)
        return loss, {n: g.t for n, g in bwd.gradients.items()}, error

    def loss_on(self, req: ProgramRequest, plan: Plan, part: str) -> float:
        """The loss on VAL_ROWS fixed rows of `part` (a forward only)."""
        return self.measure(req, plan, part)[0]

    def measure(self, req: ProgramRequest, plan: Plan, part: str) -> tuple[float, float | None]:
        """(loss, accuracy) on the fixed rows of `part` (a forward only); the accuracy of an
        image program whose forward names its class scores (`logits` or `scores`), else None."""
        names = self.setup.names
        made = make_inputs(req.inputs, req.seed, req.dtype)
        fields = data_fields(names.data, names.block_size, _rows(req, names), req.seed, part)
        self._put(made, req, fields)
        fwd = _forward(plan.forward, _scope(made, self.params), self.check, self.maker)
        accuracy = None
        if names.scores is not None:
            scores = fwd.scope[names.scores].t
            if scores.dim() == 2 and scores.shape[0] == fields["Y"].shape[0]:
                accuracy = (scores.argmax(1) == fields["Y"]).double().mean().item()
        return fwd.scope[req.loss].t.item(), accuracy

    def samples(self, count: int) -> list[str]:
        """`count` names drawn from the network as it is now (see the module's docstring)."""
        names = self.setup.names
        req = names.sample
        made = make_inputs(req.inputs, req.seed, req.dtype)
        fields = data_fields("names", names.block_size, SAMPLE_ROWS, req.seed, "train")
        X = fields["X"].clone()
        context = torch.zeros(count, names.block_size, dtype=torch.int64)
        out: list[list[int]] = [[] for _ in range(count)]
        live = torch.ones(count, dtype=torch.bool)
        for _ in range(MAX_NAME):
            X[:count] = context
            self._put(made, req, {**fields, "X": X})
            fwd = _forward(names.sample_forward, _scope(made, self.params), self.check, self.maker)
            logits = fwd.scope[LOGITS].t[:count].double()
            if logits.dim() == 3:  # a sequence model: the prediction after the last position
                logits = logits[:, -1]
            probs = torch.softmax(logits, -1)
            nxt = torch.multinomial(probs, 1, generator=self.sampler).squeeze(1)
            for i in range(count):
                if live[i]:
                    if nxt[i].item() == 0:
                        live[i] = False
                    else:
                        out[i].append(int(nxt[i]))
            if not live.any():
                break
            context = torch.cat([context[:, 1:], nxt.unsqueeze(1)], 1)
        return ["".join(ALPHABET[i] for i in word) for word in out]


def _rows(req: ProgramRequest, names: DataTask) -> int:
    return req.inputs[names.x_input or names.y_input].rows


def train(
    setup: Setup,
    should_stop: Callable[[], bool] = lambda: False,
    time_limit_s: float | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """("step", {step, loss, batch_loss, steps_per_s, and every `eval_every` steps val_loss
    and samples}) every `report_every` steps and after the last, then ("done", {...}). The
    first step's val_loss (and val_accuracy) is the starting weights', like its loss. The
    loop is app/runs/loop.py's; `ProgramSteps` says what a step computes."""
    start = time.perf_counter()

    def check() -> None:
        if should_stop():
            raise RunCancelled("the training was stopped")

    t = Trainer(setup, check)
    s = ProgramSteps(t, start)
    names = setup.names
    outcome = yield from loop(
        s,
        setup.steps,
        start=start,
        report_every=setup.report_every,
        eval_every=setup.eval_every,
        should_stop=should_stop,
        time_limit_s=time_limit_s,
        kind="step",
    )
    if outcome is None:  # an "error" event said why
        return
    step, stopped = outcome.steps, outcome.stopped
    done: dict[str, Any] = {
        "steps": step,
        "stopped": stopped,
        "loss": finite_or_none(outcome.last_loss),
        "trained": s.trained or [],
        "fixed": sorted(s.fixed),
        "fixed_why": s.fixed,
        "backward_error": s.backward_error,
    }
    try:
        if names is not None and step:
            done["train_loss"] = finite_or_none(t.loss_on(names.val, names.val_plan, "train"))
            val_loss, accuracy = t.measure(names.val, names.val_plan, "val")
            done["val_loss"] = finite_or_none(val_loss)
            if accuracy is not None:
                done["val_accuracy"] = accuracy
            if s.sampling and stopped != "diverged":
                done["samples"] = _samples(t, SAMPLES)
    except RunCancelled:
        done["stopped"] = "stopped"
    done["seconds"] = time.perf_counter() - start
    yield "done", done


class ProgramSteps:
    """A program's training steps (app/runs/loop.py's `Steps`): the learner's forward and
    backward on a minibatch, plain SGD on what the first step's backward wrote, and at each
    evaluation the val loss (the starting weights' at step 1) and names sampled."""

    def __init__(self, t: Trainer, start: float):
        self.t, self.start = t, start
        names = t.setup.names
        self.sampling = names is not None and names.sample_forward is not None
        self.trained: list[str] | None = None  # the first step decides what the backward trains
        self.fixed: dict[str, str] = {}
        self.backward_error: dict[str, Any] | None = None
        self.grads: dict[str, torch.Tensor] = {}
        self.start_val: tuple[float, float | None] | None = None

    def step(self, number: int) -> float:
        t = self.t
        try:
            loss, grads, error = t.step()
        except RunCancelled:
            raise Stop("stopped") from None
        except ProgramError as err:
            raise Failed(f"the forward failed at line {err.line}: {err}") from None
        if self.trained is None:  # the first step decides what the backward trains
            self.trained, self.fixed = _decide(t.params, grads)
            self.backward_error = programs._error_entry(error) if error else None
        missing = [n for n in self.trained
                   if n not in grads or grads[n].shape != t.params[n].shape]  # fmt: skip
        if missing:
            raise Failed(f"step {number}: the backward did not write {', '.join(missing)} "
                         "this time")  # fmt: skip
        self.grads = grads
        return loss

    def before_update(self, step: int, reporting: bool) -> None:
        names = self.t.setup.names
        self.start_val = None
        if step == 1 and names is not None:  # the first val loss: the starting weights'
            try:
                self.start_val = self.t.measure(names.val, names.val_plan, "val")
            except RunCancelled:
                raise Stop("stopped") from None

    def update(self) -> None:
        params, lr = self.t.params, self.t.setup.lr
        for name in self.trained or []:
            params[name].sub_(self.grads[name].to(params[name].dtype), alpha=lr)

    def report(self, cadence: Cadence, loss: float | None, batch_loss: float | None) -> dict:
        event: dict[str, Any] = {
            "step": cadence.step,
            "loss": loss,  # the mean since the last event
            "batch_loss": batch_loss,
            "steps_per_s": cadence.step / (time.perf_counter() - self.start),
        }
        names = self.t.setup.names
        try:
            if cadence.evaluate and names is not None:
                val_loss, accuracy = self.start_val or self.t.measure(
                    names.val, names.val_plan, "val"
                )
                event["val_loss"] = finite_or_none(val_loss)
                if accuracy is not None:
                    event["val_accuracy"] = accuracy
                if self.sampling and cadence.finite:
                    event["samples"] = _samples(self.t, SAMPLES // 2)
        except RunCancelled:
            raise Stop("stopped") from None
        return event


def _samples(t: Trainer, count: int) -> list[str] | None:
    """Names drawn from the network, or None when its weights no longer give probabilities
    (a step that went to inf or NaN: sampling cannot draw from them)."""
    try:
        return t.samples(count)
    except RuntimeError:  # torch.multinomial: "probability tensor contains inf, nan or < 0"
        return None


def _decide(
    params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]
) -> tuple[list[str], dict[str, str]]:
    """(the parameters SGD updates, {held fixed: why})."""
    trained, fixed = [], {}
    for name, p in params.items():
        g = grads.get(name)
        if g is None:
            fixed[name] = "the backward does not write its gradient"
        elif tuple(g.shape) != tuple(p.shape):
            fixed[name] = f"its gradient has shape {tuple(g.shape)}, not {tuple(p.shape)}"
        elif not g.is_floating_point():
            fixed[name] = "its gradient is an integer tensor"
        else:
            trained.append(name)
    return trained, fixed
