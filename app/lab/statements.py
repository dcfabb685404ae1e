"""A program's lines: the formula lab's evaluator grown from one expression to statements.

The same allowlist over `ast` (never `eval`, `exec` or `compile`), with four more kinds of
statement for what course notebooks write in a backward pass:

- `name = expr` (and `a, b = x.max(1)`), as in a formula;
- `name op= expr` (`+= -= *= /=`): in place, as PyTorch does it, on the program's own tensors;
- `name[index] = expr` and `name[index] op= expr`: the same, through an index;
- `for name in range(...):` (or `reversed(range(...))`) blocks;
- `hs.append(h)` and in-place methods (`dW.index_add_(0, ids, dY)`, `scatter_add_`,
  `index_put_`, `masked_fill_`) as lines of their own (v4), on the program's own tensors.

The forward takes the same statements (v4): loops that rebind a name, fill a fresh tensor
(`hs[:, t] = h`) or grow a list; inputs are its `protected`.

An in-place form writes the tensor the name holds, exactly as PyTorch would, so every view of
it sees the write too. It never writes a tensor that the forward made or an input: those are
`protected`, and a write into one (`dh = h; dh[h <= 0] = 0`) is refused with the `.clone()`
that PyTorch code needs there. Loops are counted before they start: a program runs at most
`MAX_EXECUTED` statements in all, so `range(10**9)` is refused at once.

Each statement leaves its names as atoms (a `Traced` with no history), so a statement's trace
is its own steps, and a long program costs in proportion to its length.
"""

from __future__ import annotations

import ast
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

from app.lab.allowlist import FormulaError, Pair, is_number
from app.lab.evaluator import Evaluator, maker_over
from app.lab.parse import source_segment
from app.lab.parse_program import AUG, Program, ProgramError, parse_program
from app.ops.joining import TensorList
from app.ops.making import Maker
from app.ops.meta_index import meta_index
from app.ops.traced import ATOM, Step, Traced

MAX_EXECUTED = 10_000  # statements run, loops' iterations counted in full
_IN_PLACE = {"+": "add_", "-": "sub_", "*": "mul_", "/": "div_"}
_SEQ = operator.attrgetter("seq")  # a step's place in the order ops ran


# --------------------------------------------------------------------------- running


@dataclass
class Executed:
    """One statement as it ran: its line, its code, what it assigned and its steps (the
    first run's; `runs` counts a loop body's)."""

    line: int
    code: str
    target: str
    steps: list[Step] = field(default_factory=list)
    runs: int = 0
    grad_of: str | None = None  # a backward line: the tensor whose gradient it writes


class Interpreter:
    """Runs a checked program over a scope of names (meta tensors: the dry run; real: the
    numbers). Its expressions are the formula lab's `Evaluator`, which asks this interpreter
    what a name means (`name`, `gradient`: `resolve`) and what a write may do
    (`before_write`, `after_write`); subclasses decide what a name means (`resolve`) and
    what an assignment writes (`assign`)."""

    def __init__(
        self,
        program: Program,
        scope: dict[str, Any],
        protected: list[torch.Tensor],
        check: Callable[[], None] | None = None,
        executed_limit: int = MAX_EXECUTED,
        maker: Maker | None = None,
    ):
        self.program = program
        self._maker = maker
        self.source = program.source
        self.scope = scope
        self.evaluator = Evaluator(program.source, self)
        self.protected = protected
        # what `_is_protected` compares a write's target with, made at the first write that
        # asks (a forward without in-place writes never asks); `protected` holds its tensors,
        # so their storages are the same then as now
        self._protected_ptrs: set[int] | None = None  # real tensors: their storages
        self._protected_ids: set[int] | None = None  # meta tensors: themselves, their bases
        self.check = check or (lambda: None)
        self.remaining = executed_limit
        self.executed: dict[int, Executed] = {}
        self.on_statement: Callable[[Executed, list[Step]], None] | None = None
        self._last_steps: list[Step] = []  # the statement's own steps (writes, dropped values)
        self._skipped = program.check_lines  # `cmp(...)` lines, skipped
        self._last_writable: weakref.ref | None = None  # the real tensor last found writable
        self._binary_nodes: dict[ast.stmt, ast.BinOp] = {}  # `x op= v` as the node `x op v`

    # ---- statements

    def run(self) -> None:
        self._block(self.program.body)

    def eval(self, node: ast.AST) -> Any:
        """An expression's value, by the evaluator."""
        return self.evaluator.eval(node)

    def fail(self, node: ast.AST, message: str, kind: str = "formula", **details: Any) -> NoReturn:
        """Refuse `node` with `message` (a FormulaError quoting the node's source)."""
        self.evaluator.fail(node, message, kind, **details)

    def _block(self, body: tuple[ast.stmt, ...] | list[ast.stmt]) -> None:
        check, skipped = self.check, self._skipped
        for stmt in body:
            check()
            if stmt in skipped:
                continue
            try:
                if type(stmt) is ast.For:
                    self._for(stmt)
                else:
                    self._statement(stmt)
            except ProgramError:
                raise
            except FormulaError as err:
                raise ProgramError(err, stmt.lineno, self.program.code(stmt)) from None

    def _count(self, n: int, stmt: ast.stmt) -> None:
        self.remaining -= n
        if self.remaining < 0:
            raise FormulaError(
                f"the program would run over {MAX_EXECUTED:,} statements (loops counted in "
                "full); write the loop as one tensor operation (e.g. index_add for an "
                "embedding's gradient)",
                "work",
            )

    def _for(self, stmt: ast.For) -> None:
        iterations = self.eval(stmt.iter)
        if not isinstance(iterations, range):
            self.fail(stmt.iter, "a loop runs over range(...)", "not_allowed")
        # the whole loop is counted before its first iteration runs (nested loops again
        # when they start): range(10**9) stops here, not after a billion steps
        needed = self._statements(stmt, iterations)
        if needed > self.remaining:
            self._count(needed, stmt)
        check, scope, name, body = self.check, self.scope, stmt.target.id, stmt.body
        for i in iterations:
            check()
            scope[name] = i
            self._block(body)

    def _statements(self, stmt: ast.For, iterations: range) -> int:
        """Statements the whole loop will run, nested loops' iterations included. A nested
        range that reads the loop's name is sized at the name's last value (range(k) is at
        most the outer range); one that cannot be sized yet is counted as it starts."""
        if not iterations:
            return 0
        name, saved = stmt.target.id, self.scope.get(stmt.target.id)
        self.scope[name] = iterations[-1]
        try:
            per_pass = 0
            for inner in stmt.body:
                if isinstance(inner, ast.For):
                    try:
                        inner_range = self.eval(inner.iter)
                    except FormulaError:
                        inner_range = range(0)
                    if isinstance(inner_range, range):
                        per_pass += 1 + self._statements(inner, inner_range)
                else:
                    per_pass += 1
        finally:
            if saved is None:
                self.scope.pop(name, None)
            else:
                self.scope[name] = saved
        return len(iterations) * per_pass

    def _statement(self, stmt: ast.Assign | ast.AugAssign | ast.Expr) -> None:
        self.remaining -= 1
        if self.remaining < 0:
            self._count(0, stmt)  # (refuses: one statement over)
        if self._last_steps:  # (a line before that stopped half way leaves nothing)
            self._last_steps = []
        if self.evaluator.made_steps:
            self.evaluator.take_made_steps()
        kind = type(stmt)
        if kind is ast.Assign:  # (the common statement first)
            target = stmt.targets[0]
            value = self.evaluator.eval(stmt.value)
            if type(target) is ast.Name:
                name = target.id
                self.assign(stmt, name, value)
            elif isinstance(target, ast.Tuple):
                self._unpack(stmt, target, value)
                name = ", ".join(self._target_name(e) for e in target.elts)
            elif isinstance(target, ast.Subscript):
                name = self._write_index(stmt, target, None, value)
            else:
                name = self._target_name(target)
                self.assign(stmt, name, value)
        elif kind is ast.Expr:  # `hs.append(h)`, `dW.index_add_(0, ids, dY)`
            value = self.evaluator.eval(stmt.value)
            if isinstance(value, Traced):
                self._note(value)
            receiver = stmt.value.func.value
            name = (self._target_name(receiver) if isinstance(receiver, ast.Name)
                    or _is_grad(receiver) else source_segment(self.source, receiver))  # fmt: skip
        else:
            symbol = AUG[type(stmt.op)]
            value = self.evaluator.eval(stmt.value)
            if isinstance(stmt.target, ast.Subscript):
                name = self._write_index(stmt, stmt.target, symbol, value)
            else:
                name = self._target_name(stmt.target)
                self._augment(stmt, name, symbol, value)
        self._record(stmt, name)

    def _record(self, stmt: ast.stmt, name: str) -> Executed:
        """The statement's entry in `executed`, made at its first run, counted at each."""
        entry = self.executed.get(stmt.lineno)
        made = self.evaluator.take_made_steps()  # every op of the line, its dropped values' too
        if entry is not None and not made and not self._last_steps and self.on_statement is None:
            entry.runs += 1  # a loop's line again, on real tensors: nothing else to keep
            return entry
        if self._last_steps:  # each step once (a value noted twice shares its history)
            steps = sorted({id(s): s for s in (*self._last_steps, *made)}.values(), key=_SEQ)
        else:  # (the evaluator's steps are each once already; a real run's lines make none)
            steps = sorted(made, key=_SEQ) if made else made
        if entry is None:
            entry = self.executed[stmt.lineno] = Executed(
                stmt.lineno, self.program.code(stmt), name, steps
            )
        entry.runs += 1
        if self.on_statement is not None:
            self.on_statement(entry, steps)
        if self._last_steps:
            self._last_steps = []
        return entry

    def _target_name(self, target: ast.expr) -> str:
        if isinstance(target, ast.Name):
            return target.id
        return f"{target.value.id}.g"

    def _unpack(self, stmt: ast.Assign, target: ast.Tuple, value: Any) -> None:
        if not isinstance(value, (tuple, list)):
            self.fail(stmt.value, f"gives one value, not {len(target.elts)} to unpack",
                      "not_allowed")  # fmt: skip
        if len(value) != len(target.elts):
            self.fail(stmt.value, f"gives {len(value)} values, not {len(target.elts)} to unpack",
                      "not_allowed")  # fmt: skip
        for element, part in zip(target.elts, value):
            self.assign(stmt, self._target_name(element), part)

    def _augment(self, stmt: ast.AugAssign, name: str, symbol: str, value: Any) -> None:
        """`name op= value`: a tensor is changed in place (as PyTorch does); a number is
        rebound (as Python does)."""
        current = self.resolve(stmt.target, name)
        if is_number(current):
            combined = self._binary(stmt, symbol, current, value)
            self.assign(stmt, name, combined)
            return
        if not isinstance(current, Traced):
            self.fail(stmt.target, f"{name} holds no tensor or number to update", "not_allowed")
        self._writable(stmt.target, name, current)
        if current.t.is_meta:  # the dry run checks and traces what the real run just does
            made = self._binary(stmt, symbol, current, value)
            self._fits(stmt, name, current, made)
            self._note(made)
        self._in_place(stmt, current.t, symbol, value)
        self.rebind(name, current)

    def _write_index(
        self, stmt: ast.stmt, target: ast.Subscript, symbol: str | None, value: Any
    ) -> str:
        """`name[index] = value` and `name[index] op= value`, as PyTorch runs them: read
        the indexed part, update it, write it back."""
        name = self._target_name(target.value)
        # (a bare name as the evaluator reads one: `name` is `resolve` with a fast path)
        current = (self.name(target.value) if type(target.value) is ast.Name
                   else self.resolve(target.value, name))  # fmt: skip
        if not isinstance(current, Traced):
            self.fail(target, f"{name} is not a tensor; only tensors take indexed writes",
                      "not_allowed")  # fmt: skip
        self._writable(target, name, current)
        index = self.evaluator.subscript(target.slice)
        parts = index if isinstance(index, tuple) else (index,)
        if not current.t.is_meta:  # checked in the dry run: write, as PyTorch does
            self._write(stmt, current, parts, symbol, value)
            self.rebind(name, current)
            return name
        part = self.evaluator.apply(target, self.evaluator.advanced_index if _advanced(parts) else _basic_index,
                           current, parts)  # fmt: skip
        if symbol is not None:
            updated = self._binary(stmt, symbol, part, value)
            self._fits(stmt, f"{name}[...]", part, updated)
        else:
            updated = value
            if isinstance(value, Traced):
                try:
                    torch.broadcast_shapes(value.shape, part.shape)
                    ok = torch.broadcast_shapes(value.shape, part.shape) == part.shape
                except RuntimeError:
                    ok = False
                if not ok:
                    self.fail(
                        stmt,
                        f"shape mismatch: the value {_fmt(value.shape)} cannot be written into "
                        f"{name}[...] of shape {_fmt(part.shape)}",
                        "shape",
                        made=list(value.shape),
                        wanted=list(part.shape),
                    )
            elif not is_number(updated):
                self.fail(stmt, "writes a tensor or a number", "not_allowed")
        if isinstance(updated, Traced):
            self._note(updated)
        if not any(_is_mask(_raw(p, current.t)) for p in parts):
            # (what a mask picks is data: the dry run cannot write it; the shape stays)
            self._write(stmt, current, parts, symbol, value)
        self._note_write(current, name, updated)
        self.rebind(name, current)
        return name

    def _write(
        self, stmt: ast.stmt, current: Traced, parts: tuple, symbol: str | None, value: Any
    ) -> Any:
        """`t[key] = value`, or `t[key] op= value` as Python runs it: read the indexed part
        (a view for a basic index, a copy for an advanced one), update it, write it back.
        Returns the key it wrote through (tensors and ranges as torch takes them)."""
        t = current.t
        key = _raw(parts[0], t) if len(parts) == 1 else tuple([_raw(p, t) for p in parts])
        update = value.t if isinstance(value, Traced) else value
        self.evaluator.apply(stmt, _write_through, t, key, symbol, update)
        return key

    def _in_place(self, stmt: ast.stmt, t: torch.Tensor, symbol: str, value: Any) -> None:
        other = value.t if isinstance(value, Traced) else value
        self.evaluator.apply(stmt, lambda: getattr(t, _IN_PLACE[symbol])(other))

    def _binary(self, stmt: ast.stmt, symbol: str, left: Any, right: Any) -> Any:
        node = self._binary_nodes.get(stmt)  # (the same every time a loop's line runs)
        if node is None or node.op is not _OP_NODES[symbol]:
            node = ast.BinOp(left=getattr(stmt, "target", stmt), op=_OP_NODES[symbol],
                             right=stmt.value)  # fmt: skip
            ast.copy_location(node, stmt)
            node.end_lineno, node.end_col_offset = stmt.end_lineno, stmt.end_col_offset
            self._binary_nodes[stmt] = node
        if is_number(left) and is_number(right):
            return self.evaluator.number(node, symbol, left, right)
        if isinstance(left, Pair) or isinstance(right, Pair):
            self.evaluator.pair_misused(node)
        if not all(isinstance(v, Traced) or is_number(v) for v in (left, right)):
            self.fail(stmt, f"{symbol}= takes tensors and numbers", "not_allowed")
        if isinstance(left, Traced) and isinstance(right, Traced):
            self.evaluator.check_broadcast(node, symbol, left, right)
        return self.evaluator.apply(node, _BINARY[symbol], left, right)

    def _fits(self, stmt: ast.stmt, name: str, current: Traced, made: Any) -> None:
        """In place, the result keeps the target's shape and dtype (PyTorch refuses a
        broadcast that would grow it, and an int target cannot take floats)."""
        if not isinstance(made, Traced):
            return
        if made.shape != current.shape:
            self.fail(
                stmt,
                f"in place, {name} keeps its shape {_fmt(current.shape)}, but the update "
                f"broadcasts to {_fmt(made.shape)}: PyTorch refuses this. Sum the update "
                f"down to {_fmt(current.shape)} first, or write `{name} = {name} + ...` to "
                "make a new tensor",
                "shape",
                made=list(made.shape),
                wanted=list(current.shape),
            )
        if made.t.is_floating_point() and not current.t.is_floating_point():
            self.fail(
                stmt,
                f"{name} is an integer tensor; in place it cannot take a float update "
                "(start from a float tensor: torch.zeros_like(x) of a float x, or .float())",
                "not_allowed",
            )

    def _writable(self, node: ast.AST, name: str, current: Traced) -> None:
        """Refuse a write into the forward's tensors or the inputs, through any alias."""
        if self._is_protected(current.t):
            self.fail(
                node,
                f"{name} is (a view of) a tensor of the forward or an input here, so this "
                f"in-place write would change it, as it would in PyTorch. Start from a copy: "
                f"`{name} = <tensor>.clone()`, or torch.zeros_like(<tensor>)",
                "not_allowed",
            )

    def _is_protected(self, t: torch.Tensor) -> bool:
        if t.is_meta:
            if self._protected_ids is None:
                self._protected_ids = {id(p) for p in self.protected} | {
                    id(p._base) for p in self.protected if p._base is not None
                }
            chain = [t]
            while chain[-1]._base is not None and len(chain) < 8:
                chain.append(chain[-1]._base)
            return any(id(c) in self._protected_ids for c in chain)
        last = self._last_writable
        if last is not None and last() is t:  # a loop writing one tensor: its storage is known
            return False
        if self._protected_ptrs is None:
            self._protected_ptrs = {
                p.untyped_storage().data_ptr()
                for p in self.protected
                if not p.is_meta and p.numel()
            }
        if t.numel() > 0 and t.untyped_storage().data_ptr() in self._protected_ptrs:
            return True
        self._last_writable = weakref.ref(t)  # (weak: a rebound name still frees its tensor)
        return False

    # ---- in-place methods (`dW.index_add_(...)`, `att.masked_fill_(...)`)

    def before_write(self, node: ast.AST, target: ast.expr, value: Any) -> None:
        if not isinstance(value, Traced):
            self.fail(node, "only tensors are written in place", "not_allowed")
        self._writable(node, source_segment(self.source, target), value)

    def after_write(self, target: ast.expr, value: Any) -> None:
        if isinstance(target, ast.Name) or _is_grad(target):
            name = self._target_name(target)
            self.rebind(name, self.resolve(target, name))

    def maker(self) -> Maker:
        return self._maker if self._maker is not None else maker_over(self.operands())

    def operands(self) -> list[Any]:
        """The values the program reads (where a tensor it makes goes, without a maker)."""
        return list(self.scope.values())

    # ---- what subclasses decide

    def resolve(self, node: ast.AST, name: str) -> Any:
        if name not in self.scope:
            self.fail(node, f"{name} is used before it is assigned", "name")
        return self.scope[name]

    def assign(self, stmt: ast.stmt, name: str, value: Any) -> None:
        self.scope[name] = self.atom(name, value)

    def rebind(self, name: str, value: Traced) -> None:
        """After an in-place write: the same tensor, under its name, with no history."""
        self.scope[name] = Traced(value.t, name)

    def atom(self, name: str, value: Any) -> Any:
        if isinstance(value, Traced):
            if value.steps:
                self._note(value)
            return Traced(value.t, name)
        if isinstance(value, Pair):
            return Pair(tuple(self.atom(f"{name}[{i}]", v) for i, v in enumerate(value)))
        if isinstance(value, TensorList):  # the same list (Python's aliasing), named
            for i, v in enumerate(value):
                if v.steps:
                    value[i] = self.atom(f"{name}[{i}]", v)
            if not value.name:
                value.name = name
            return value
        if isinstance(value, tuple) and any(isinstance(v, Traced) for v in value):
            return tuple(self.atom(f"{name}[{i}]", v) for i, v in enumerate(value))
        return value

    # ---- the statement's steps

    def _note(self, value: Traced) -> None:
        self._last_steps.extend(value.steps)

    def _note_write(self, target: Traced, name: str, value: Any) -> None:
        """The write itself: no new memory (it lands in the target), one step in the trace."""
        if not target.t.is_meta:
            return
        inputs = [target.shape] + ([value.shape] if isinstance(value, Traced) else [])
        step = Step("write", "index_put", f"{name}[...] = ...", inputs, target.shape, 0,
                    {"in_place": True})  # fmt: skip
        self._last_steps.append(step)

    # ---- names, as the evaluator asks for them

    def name(self, node: ast.Name) -> Any:
        return self.resolve(node, node.id)

    def gradient(self, node: ast.Attribute) -> Any:
        if not isinstance(node.value, ast.Name):
            self.fail(node, ".g is read on a tensor's name, as in out.g", "not_allowed")
        return self.resolve(node, f"{node.value.id}.g")


def _is_grad(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "g" and isinstance(node.value, ast.Name)


def _advanced(parts: tuple) -> bool:
    return any(isinstance(p, (Traced, range)) for p in parts)


def _basic_index(value: Traced, parts: tuple) -> Traced:
    return value[parts[0] if len(parts) == 1 else parts]


def _write_through(t: torch.Tensor, key: Any, symbol: str | None, update: Any) -> None:
    """`t[key] = update`, or `t[key] op= update` as Python runs it: read the indexed part (a
    view for a basic index, a copy for an advanced one), update it in place, write it back."""
    if symbol is None:
        t[key] = update
        return
    piece = t[key]
    getattr(piece, _IN_PLACE[symbol])(update)
    t[key] = piece


def _is_mask(part: Any) -> bool:
    return isinstance(part, torch.Tensor) and part.dtype == torch.bool


def _raw(part: Any, like: torch.Tensor) -> Any:
    if type(part) is Traced:
        return meta_index(part.t) if part.t.is_meta else part.t
    if isinstance(part, range):
        return torch.arange(part.start, part.stop, part.step, device=like.device)
    return part


_OP_NODES = {"+": ast.Add(), "-": ast.Sub(), "*": ast.Mult(), "/": ast.Div()}
_BINARY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def _fmt(shape: tuple) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


__all__ = [
    "ATOM",
    "MAX_EXECUTED",
    "Executed",
    "Interpreter",
    "Program",
    "ProgramError",
    "parse_program",
]
