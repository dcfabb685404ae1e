"""A program's dry run: before anything real runs, `admit` runs both texts on meta tensors
through the same interpreters the real run uses: shapes, bytes and work of every line (loops
counted in full), and every refusal (a 422 at `["body", "forward" | "backward", line]`). A
backward line that cannot run is not refused: it becomes the plan's `stops_at`, and the lines
before it are run and checked, as a notebook would have run them.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from app.check.diagnosis import has_repeats, one_write_delta
from app.lab.allowlist import FormulaError, Pair
from app.lab.statements import Executed, Interpreter, Program, ProgramError, parse_program
from app.ops.cancel import check_cancelled
from app.ops.joining import TensorList
from app.ops.making import Maker
from app.ops.traced import Traced
from app.programs.dry_cost import DryCost, ProgramRefused, mib
from app.programs.inputs import DTYPES, data_rows, meta_of
from app.programs.schemas import ProgramRequest

GRAD_PREFIX = "d"
GRAD_SUFFIX = ".g"
# rerun in float64 to tell a real difference from float32 rounding (the `suspect` verdict)
# when the whole program is estimated under this
SUSPECT_RERUN_MAX_S = 0.6
# kinds of evaluator error that refuse the request (422) rather than stop the backward
REFUSING_KINDS = frozenset({"syntax", "not_allowed", "too_long", "budget", "work"})


# --------------------------------------------------------------------------- the interpreters


class ForwardRun(Interpreter):
    """The forward: lines over the inputs (loops, lists and in-place fills of its own fresh
    tensors too). A name may be rebound (`h = ...` in a loop): its gradient is that of its
    value after the statement that last wrote it."""

    def __init__(self, program: Program, inputs: dict[str, Any], check: Callable[[], None],
                 maker: Maker | None = None):  # fmt: skip
        protected = [v.t for v in inputs.values() if isinstance(v, Traced)]
        super().__init__(program, dict(inputs), protected, check, maker=maker)
        self.input_names = dict.fromkeys(inputs)  # in the request's order, as a refusal lists them
        self.assigned: list[str] = []

    def resolve(self, node: ast.AST, name: str) -> Any:
        if name.endswith(GRAD_SUFFIX):
            self.fail(node, "the forward reads no gradients; .g belongs to the backward", "name")
        if name not in self.scope:
            known = ", ".join([*self.input_names, *self.assigned]) or "none"
            self.fail(
                node,
                f"{name} is not an input and no line above assigns it (known here: {known}); "
                "add it to `inputs`, or assign it first",
                "name",
            )
        return self.scope[name]

    def assign(self, stmt: ast.stmt, name: str, value: Any) -> None:
        if name.endswith(GRAD_SUFFIX):
            self.fail(stmt, "the forward assigns values; gradients (.g) belong to the backward",
                      "not_allowed")  # fmt: skip
        if name in self.input_names:
            self.fail(stmt, f"{name} is an input; the forward makes new names from it",
                      "not_allowed")  # fmt: skip
        if isinstance(value, range):
            self.fail(stmt, "a range is for indexing and loops, not a value", "not_allowed")
        if name not in self.assigned:
            self.assigned.append(name)
        super().assign(stmt, name, value)


class BackwardRun(Interpreter):
    """The learner's backward: reads the forward's tensors (never writes them), writes
    gradients (`d<name>` / `<name>.g`) and helpers of its own."""

    def __init__(
        self,
        program: Program,
        forward: dict[str, Any],
        has_grad: set[str],
        check: Callable[[], None],
        maker: Maker | None = None,
    ):
        protected = [t.t for v in forward.values() for t in _tensors(v)]
        super().__init__(program, {}, protected, check, maker=maker)
        self.forward = forward
        self.has_grad = has_grad
        self.gradients: dict[str, Traced] = {}  # tensor name -> its gradient, as written
        self.lines: dict[str, list[int]] = {}  # tensor name -> the lines that wrote it
        self.spelling: dict[str, str] = {}  # tensor name -> how the learner named its grad
        # tensor name -> what its indexed `+=` lost to one write per repeated index (the
        # `dropped_duplicates` diagnosis; app/check/diagnosis.py)
        self.dropped: dict[str, torch.Tensor] = {}
        self._grad_names: dict[str, str | None] = {}  # name -> grad_of(name), as asked
        self._writes: dict[ast.stmt, tuple[str, ...]] = {}  # statement -> the gradients it names
        # statement -> its entry's grad_of, once it has written every gradient it names and
        # its line is noted: a loop's line again notes nothing new (a gradient once written
        # stays written)
        self._noted: dict[ast.stmt, str] = {}

    def operands(self) -> list[Any]:
        return [*self.forward.values(), *self.scope.values()]

    def grad_of(self, name: str) -> str | None:
        """The tensor whose gradient `name` is, or None for a helper."""
        tensor = self._grad_names.get(name, _UNSEEN)  # (asked several times a statement)
        if tensor is _UNSEEN:
            tensor = self._grad_names[name] = _grad_of(name, self.has_grad)
        return tensor

    def name(self, node: ast.Name) -> Any:
        """`resolve`'s three common answers first (a loop's name, a forward tensor, a gradient
        written above, as `demb[k, j]`): a loop body reads several names every iteration."""
        name = node.id
        if name in self.scope:
            if name not in self.forward:
                return self.scope[name]
        elif name in self.forward:
            return self.forward[name]
        elif (tensor := self._grad_names.get(name)) in self.gradients:  # (None if unseen)
            return self.gradients[tensor]
        return self.resolve(node, name)

    def resolve(self, node: ast.AST, name: str) -> Any:
        if name in self.scope:  # a loop's name or a number of its own shadows the forward's
            if name not in self.forward or not _tensors(self.forward[name]):
                return self.scope[name]
        if name in self.forward:
            return self.forward[name]
        tensor = self.grad_of(name)
        if tensor is not None:
            if tensor not in self.has_grad:
                self.fail(node, self._no_grad(tensor), "name")
            if tensor not in self.gradients:
                self.fail(node, f"{name} is read before any line writes it", "name")
            return self.gradients[tensor]
        if name not in self.scope:
            self.fail(node, f"{name} is not a tensor of the forward, a gradient written above, "
                      "or a helper assigned above", "name")  # fmt: skip
        return self.scope[name]

    def _no_grad(self, tensor: str) -> str:
        if tensor in self.forward:
            return f"{tensor} has no gradient: nothing that needs one flows through it"
        return f"the forward has no tensor {tensor}"

    def assign(self, stmt: ast.stmt, name: str, value: Any) -> None:
        if name in self.forward and (_tensors(self.forward[name]) or _tensors(value)):
            self.fail(
                stmt,
                f"{name} is the forward's; the backward writes gradients ({GRAD_PREFIX}{name} "
                f"or {name}.g) and helpers of its own",
                "not_allowed",
            )
        tensor = self.grad_of(name)
        if tensor is None:
            self.scope[name] = self.atom(name, value)
            return
        if tensor not in self.has_grad:
            self.fail(stmt, self._no_grad(tensor), "name")
        if not isinstance(value, Traced):
            self.fail(stmt, f"{name} is a gradient: a tensor, not {type(value).__name__}",
                      "not_allowed")  # fmt: skip
        self.gradients[tensor] = self.atom(name, value)
        self.spelling.setdefault(tensor, name)

    def rebind(self, name: str, value: Traced) -> None:
        tensor = self.grad_of(name)
        if tensor is None:
            self.scope[name] = Traced(value.t, name)
            return
        self.gradients[tensor] = Traced(value.t, name)

    def _write(
        self, stmt: ast.stmt, current: Traced, parts: tuple, symbol: str | None, value: Any
    ) -> Any:
        """An indexed write, as the interpreter runs it; `g[ids] += v` into a gradient with
        repeated ids also keeps what the one write per index lost (real tensors only)."""
        key = super()._write(stmt, current, parts, symbol, value)  # (a range as an arange)
        if symbol not in ("+", "-") or current.t.is_meta:
            return key
        tensor = None
        if has_repeats(key):
            tensor = next((n for n, g in self.gradients.items() if g.t is current.t), None)
        if tensor is not None:
            update = value.t if isinstance(value, Traced) else torch.tensor(value)
            update = update.to(current.t.dtype) * (1 if symbol == "+" else -1)
            delta = one_write_delta(tuple(current.t.shape), key, update)
            self.dropped[tensor] = self.dropped[tensor] + delta if tensor in self.dropped else delta
        return key

    def _record(self, stmt: ast.stmt, name: str) -> Executed:
        """Which gradients the line wrote (assigned, or changed in place), and where."""
        entry = super()._record(stmt, name)
        named = self._writes.get(stmt)
        if named is None:  # (a statement's target names are the same every time it runs)
            names = name.split(", ") if ", " in name else (name,)  # `a, b = ...` writes two
            named = tuple(t for t in map(self.grad_of, names) if t is not None)
            self._writes[stmt] = named
        if not named:  # a helper's line
            entry.grad_of = None
            return entry
        noted = self._noted.get(stmt)
        if noted is not None:
            entry.grad_of = noted  # (a line of two statements is the last one's)
            return entry
        written = [t for t in named if t in self.gradients]
        entry.grad_of = written[0] if written else None
        for tensor in written:
            lines = self.lines.get(tensor)
            if lines is None:
                lines = self.lines[tensor] = []
            if stmt.lineno not in lines:
                lines.append(stmt.lineno)
        if len(written) == len(named):
            self._noted[stmt] = written[0]
        return entry


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """What the dry run learned: the traces, the cost, and where the backward stops."""

    forward: Program
    backward: Program
    forward_lines: dict[int, Executed]
    backward_lines: dict[int, Executed]
    has_grad: list[str]  # tensors with a gradient, inputs first, then the forward's order
    intermediates: list[str]  # the forward's names, in order
    stops_at: ProgramError | None  # the first backward line that cannot run
    seconds: float
    bytes: int
    rerun: bool  # a float64 rerun judges `suspect`
    forward_reads: dict[str, list[int]] = field(default_factory=dict)
    known: frozenset[str] = frozenset()  # the inputs' and the forward's names
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # of has_grad's tensors
    # what every answer of this plan says alike (its lines' entries), made at its first answer:
    # a plan is kept for the program posted again (app/programs/admission.py)
    answered: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


_UNSEEN = object()


def _grad_of(name: str, has_grad: set[str]) -> str | None:
    if name.endswith(GRAD_SUFFIX):
        return name.removesuffix(GRAD_SUFFIX)
    if name.startswith(GRAD_PREFIX) and name[1:] in has_grad:
        return name[1:]
    return None


def _tensors(value: Any) -> list[Traced]:
    """The tensors a value holds: itself, or a list's or a pair's."""
    if isinstance(value, Traced):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, Traced)]
    return []


def _gradients_made(
    req: ProgramRequest, forward: Program, fwd: ForwardRun, has_grad: list[str],
    itemsize: int, room: int,
) -> int:  # fmt: skip
    """Bytes autograd makes that the forward's own count misses, refused past `room`: the
    gradient of every input with one, and of every view the forward names (an `expand` takes
    no memory, but its gradient is made whole); and the check's two float64 temporaries of
    the largest gradient."""
    sizes: dict[str, int] = {}
    for name in has_grad:
        t = fwd.scope[name].t if name in fwd.scope else None
        if t is None or not isinstance(t, torch.Tensor):
            continue
        if name in req.inputs or t._is_view():
            sizes[name] = t.numel() * itemsize
    largest = max((fwd.scope[n].t.numel() for n in has_grad if n in fwd.scope), default=0)
    check = 2 * largest * 8
    total = sum(sizes.values()) + check
    if total > room:
        name = max(sizes, key=sizes.get, default=None)
        why = (
            f"the gradient of `{name}` ({mib(sizes[name])}: autograd makes a view's or an "
            "input's gradient whole, whatever the view costs)"
            if name is not None
            else "the check's copies of its largest gradient"
        )
        line = _line_of(forward, name) if name is not None and name not in req.inputs else None
        raise ProgramRefused(
            "forward" if line is not None else "inputs",
            line if line is not None else name,
            f"autograd would make {mib(total)} more than the forward's own tensors, "
            f"mostly {why}; that is over what the server's memory budget leaves "
            f"({mib(max(room, 0))}): make the shapes smaller",
            "budget",
            bytes=total,
            budget_bytes=room,
        )
    return total


def _refuse_rows_past_the_data(req: ProgramRequest) -> None:
    """A data input asks for at most the data's training rows (a 422 at the input)."""
    for name, spec in req.inputs.items():
        if spec.data is not None and spec.rows > (available := data_rows(spec.data)):
            raise ProgramRefused(
                "inputs", name,
                f"{name}: rows {spec.rows:,} is more than the {spec.data} data's {available:,} "
                "training rows; ask for at most that many",
                "rows", rows=spec.rows, available=available,
            )  # fmt: skip


def _meta_inputs(req: ProgramRequest) -> tuple[dict[str, Any], int]:
    dtype = DTYPES[req.dtype]
    scope: dict[str, Any] = {}
    total = 0
    for name, spec in req.inputs.items():
        info = meta_of(spec)
        if info.shape is None:
            scope[name] = spec.value
            continue
        t = torch.empty(info.shape, dtype=torch.int64 if info.integer else dtype, device="meta")
        if info.grad:
            t.requires_grad_()
        total += t.numel() * t.element_size()
        scope[name] = Traced(t, name)
    return scope, total


def admit(req: ProgramRequest, memory_budget: int, work_limit_s: float) -> Plan:
    """The dry run: every refusal before anything real is made (ProgramRefused)."""
    forward = _parse(req.forward, "forward")
    backward = _parse(req.backward, "backward")
    _refuse_rows_past_the_data(req)
    scope, input_bytes = _meta_inputs(req)
    itemsize = torch.empty((), dtype=DTYPES[req.dtype]).element_size()
    cost = DryCost(itemsize, work_limit_s, memory_budget - input_bytes, "forward", memory_budget)
    maker = Maker("meta", DTYPES[req.dtype])
    fwd = ForwardRun(forward, scope, check_cancelled, maker=maker)
    fwd.on_statement = cost.add
    with torch.enable_grad():
        _run(fwd, "forward")
    loss = _loss_of(req, fwd, forward)
    if not loss.t.requires_grad:
        raise ProgramRefused("forward", _line_of(forward, req.loss), f"{req.loss} does not "
                             "depend on any input with a gradient (grad: true)", "name")  # fmt: skip
    has_grad = [n for n in req.inputs if _requires_grad(scope.get(n))] + [
        n for n in fwd.assigned if _requires_grad(fwd.scope[n])
    ]
    if writes_in_place(forward):
        _autograd_on_meta(req, forward, loss, [fwd.scope[n].t for n in has_grad])
    env = {n: detached(v) for n, v in fwd.scope.items()}
    # the run keeps the forward, autograd's saved tensors and the retained gradients
    forward_bytes = cost.kept
    made_bytes = _gradients_made(req, forward, fwd, has_grad, itemsize,
                                 memory_budget - input_bytes - 3 * forward_bytes)  # fmt: skip
    back_cost = DryCost(
        itemsize, max(0.0, work_limit_s - 3 * cost.seconds),
        memory_budget - input_bytes - 3 * forward_bytes - made_bytes, "backward", memory_budget,
    )  # fmt: skip
    bwd = BackwardRun(backward, env, set(has_grad), check_cancelled, maker=maker)
    bwd.on_statement = back_cost.add
    stops_at = None
    with torch.no_grad():
        try:
            bwd.run()
        except ProgramError as err:
            if err.kind in REFUSING_KINDS:
                raise ProgramRefused(
                    "backward", err.line, str(err), err.kind, **error_context(err)
                ) from None
            stops_at = err
    seconds = 3 * cost.seconds + back_cost.seconds
    rerun = req.dtype == "float32" and seconds * 2.2 <= min(SUSPECT_RERUN_MAX_S, work_limit_s)
    return Plan(
        forward=forward,
        backward=backward,
        forward_lines=fwd.executed,
        backward_lines=bwd.executed,
        has_grad=has_grad,
        intermediates=list(fwd.assigned),
        stops_at=stops_at,
        seconds=seconds * (2.2 if rerun else 1.0),
        bytes=input_bytes + 3 * forward_bytes + made_bytes + back_cost.kept + back_cost.peak_temp,
        rerun=rerun,
        forward_reads=_reads(forward),
        known=frozenset([*req.inputs, *fwd.assigned]),
        shapes={n: tuple(fwd.scope[n].t.shape) for n in has_grad if n in fwd.scope},
    )


def followed_tensor(grad: str, has_grad: set[str]) -> str | None:
    """The tensor whose gradient `grad` names: dWq, Wq.g or Wq itself (None: no such)."""
    if grad in has_grad:
        return grad
    if grad.endswith(GRAD_SUFFIX) and grad.removesuffix(GRAD_SUFFIX) in has_grad:
        return grad.removesuffix(GRAD_SUFFIX)
    if grad.startswith(GRAD_PREFIX) and grad[len(GRAD_PREFIX) :] in has_grad:
        return grad[len(GRAD_PREFIX) :]
    return None


def admit_follow(req: ProgramRequest, plan: Plan) -> None:
    """`follow` names a tensor with a gradient, and an index inside it (a 422 at the field)."""
    has_grad = set(plan.has_grad)
    tensor = followed_tensor(req.follow.grad, has_grad)
    if tensor is None:
        raise ProgramRefused("follow", "grad", f"follow: {req.follow.grad} is not a gradient of "
                             f"this program (these have one: {', '.join(sorted(has_grad))})",
                             "follow")  # fmt: skip
    shape = plan.shapes.get(tensor)
    index = tuple(req.follow.index)
    if shape is not None and (len(index) != len(shape) or any(
            i >= s for i, s in zip(index, shape))):  # fmt: skip
        raise ProgramRefused("follow", "index", f"follow: index {list(index)} is not inside "
                             f"{tensor}'s shape {list(shape)}", "follow")  # fmt: skip


def writes_in_place(program: Program) -> bool:
    """Whether a text writes a tensor in place anywhere (`+=`, `x[i] = ...`, `x.f_(...)`)."""
    for stmt in program.body:
        for node in ast.walk(stmt):
            if isinstance(node, (ast.AugAssign, ast.Expr)):
                return True
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Subscript):
                return True
    return False


def _autograd_on_meta(req: ProgramRequest, forward: Program, loss: Traced,
                      tensors: list[torch.Tensor]) -> None:  # fmt: skip
    """The forward's backward on meta tensors: an in-place write into a tensor autograd saved
    (PyTorch's "modified by an inplace operation") is refused here, before anything runs."""
    try:
        torch.autograd.grad(loss.t, tensors, allow_unused=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0].replace("MetaFloatType", "tensor").replace(
            "MetaDoubleType", "tensor")  # fmt: skip
        raise ProgramRefused(
            "forward",
            _line_of(forward, req.loss),
            f"autograd cannot run this forward backwards: {first.split('. Hint')[0]}. An in-place "
            "write changed a tensor that a line above saved for its gradient: write into a "
            "fresh tensor (torch.zeros) or rebind the name (`x = x + ...`)",
            "not_allowed",
        ) from None


def _parse(source: str, which: str) -> Program:
    try:
        return parse_program(source, which)
    except ProgramError as err:
        raise ProgramRefused(which, err.line, str(err), err.kind, **error_context(err)) from None


def _run(interp: Interpreter, which: str) -> None:
    try:
        interp.run()
    except ProgramError as err:
        raise ProgramRefused(which, err.line, str(err), err.kind, **error_context(err)) from None


def error_context(err: FormulaError) -> dict[str, Any]:
    return {k: v for k, v in err.details.items() if k in ("operands", "dim", "sizes", "made",
                                                          "wanted", "expr")}  # fmt: skip


def _loss_of(req: ProgramRequest, fwd: ForwardRun, forward: Program) -> Traced:
    last = forward.body[-1].lineno if forward.body else 1
    if req.loss not in fwd.assigned:
        raise ProgramRefused("forward", last, f"the forward never assigns {req.loss}: end it "
                             f"with `{req.loss} = ...` (the scalar loss)", "name")  # fmt: skip
    loss = fwd.scope[req.loss]
    line = _line_of(forward, req.loss)
    if not isinstance(loss, Traced) or loss.t.numel() != 1 or not loss.t.is_floating_point():
        shape = tuple(loss.t.shape) if isinstance(loss, Traced) else type(loss).__name__
        raise ProgramRefused("forward", line, f"{req.loss} must be a scalar float tensor; it is "
                             f"{shape} (take .mean() or .sum())", "shape")  # fmt: skip
    return loss


def _line_of(program: Program, name: str) -> int:
    for stmt in program.body:
        if isinstance(stmt, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in stmt.targets
        ):
            return stmt.lineno
    return 1


def _reads(program: Program) -> dict[str, list[int]]:
    """name -> the forward lines that read it (a tensor read twice gets two gradients)."""
    reads: dict[str, list[int]] = {}
    for stmt in program.body:
        for node in ast.walk(stmt.value if isinstance(stmt, ast.Assign) else stmt):
            if isinstance(node, ast.Name):
                reads.setdefault(node.id, [])
                if stmt.lineno not in reads[node.id]:
                    reads[node.id].append(stmt.lineno)
    return reads


def line_reads(plan: Plan, line: int) -> list[str]:
    """The inputs and forward names that forward line `line` reads, in order of first read
    (the edges of the page's shape-flow diagram)."""
    return [n for n, lines in plan.forward_reads.items() if line in lines and n in plan.known]


def _requires_grad(value: Any) -> bool:
    return isinstance(value, Traced) and value.t.requires_grad


def detached(value: Any) -> Any:
    if isinstance(value, Traced):
        return Traced(value.t.detach(), value.expr)
    if isinstance(value, Pair):
        return Pair(tuple(detached(v) for v in value))
    if isinstance(value, TensorList):  # the forward's list: the backward reads, never grows it
        out = TensorList(detached(v) for v in value)
        out.name, out.frozen = value.name, True
        return out
    if isinstance(value, tuple):
        return tuple(detached(v) for v in value)
    return value
