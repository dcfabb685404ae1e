"""Reading a program: each text (forward, backward) -> checked statements, no tensor touched.

The formula's allowlist (app/lab/allowlist.py) plus the statements a notebook's backward pass
writes (augmented assignment, indexed assignment, `for ... in range(...)`); each refusal names
its line. Running them is app/lab/statements.py.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache

from app.lab.allowlist import BUILTINS, NAMESPACES, NODES, FormulaError
from app.lab.parse import _PARSE_LOCK, check_tree, code_lines, source_segment

MAX_PROGRAM_CHARS = 20_000  # per text (forward, backward)
MAX_PROGRAM_NODES = 12_000
MAX_LINES = 400  # statements written, loops' bodies included

PROGRAM_NODES = NODES | {ast.AugAssign, ast.For}
MAX_UNPACK = 16  # `q, k, v = x.split(C, dim=2)`
# a notebook's own comparison lines, accepted and skipped (every gradient is checked anyway)
CHECK_CALLS = frozenset({"cmp"})
AUG = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


class ProgramError(FormulaError):
    """A statement that cannot run, with its line (1-based, in its own text)."""

    def __init__(self, err: FormulaError, line: int, code: str):
        super().__init__(str(err), err.kind, **err.details)
        self.line = line
        self.code = code


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Program:
    """A checked text: its statements, and each line's source for messages."""

    which: str  # "forward" or "backward"
    source: str
    body: tuple[ast.stmt, ...]

    def code(self, stmt: ast.stmt) -> str:
        """The statement's first line as written (a loop's header, not its body)."""
        return self._lines[stmt.lineno - 1]

    @cached_property
    def _lines(self) -> tuple[str, ...]:
        """Each line as `code` shows it, stripped once (each run records every line)."""
        return tuple(line.strip() for line in code_lines(self.source))

    @cached_property
    def check_lines(self) -> frozenset[ast.stmt]:
        """The notebook's `cmp(...)` statements, loops' included, that a run skips: found
        once per program, not per run (a kept plan's program runs every time it is posted)."""
        return _check_lines(self.body)


def parse_program(source: str, which: str) -> Program:
    """Read and check a forward or backward text against the allowlist; nothing runs.
    ProgramError (with its line) for what cannot be read or is not allowed.

    The same text gives the same Program (read and checked once: each edit of the backward
    posts the unchanged forward again). A Program is frozen and nothing writes into its
    statements; a refusal (an exception) is not kept, so it is read and refused again."""
    return _parse_program(source, which)


@lru_cache(maxsize=32)  # (source, which) -> its Program (at most 20,000 characters each)
def _parse_program(source: str, which: str) -> Program:
    if len(source) > MAX_PROGRAM_CHARS:
        raise ProgramError(
            FormulaError(
                f"the {which} is {len(source)} characters long; at most {MAX_PROGRAM_CHARS}",
                "too_long",
            ),
            1,
            "",
        )
    try:
        with _PARSE_LOCK:  # one ast.parse at a time (CPython 3.11's shared state)
            tree = ast.parse(source, mode="exec")  # a tree only: no code object, nothing runs
    except SyntaxError as err:
        line = err.lineno or 1
        raise ProgramError(
            FormulaError(f"syntax error (line {line}, column {err.offset}): {err.msg}", "syntax"),
            line,
            _line(source, line),
        ) from None
    except (ValueError, MemoryError, RecursionError, SystemError) as err:
        raise ProgramError(
            FormulaError(f"the {which} cannot be read: {err}", "syntax"), 1, ""
        ) from None
    program = Program(which, source, tuple(tree.body))
    lines = 0
    for stmt in tree.body:
        try:
            check_tree(stmt, source, PROGRAM_NODES, MAX_PROGRAM_NODES, program=True)
            lines += _check_statement(stmt, source, which, top=True)
        except FormulaError as err:
            bad = getattr(err, "node_line", None) or stmt.lineno
            raise ProgramError(err, bad, _line(source, bad)) from None
        if lines > MAX_LINES:
            raise ProgramError(
                FormulaError(f"the {which} has over {MAX_LINES} statements", "too_long"),
                stmt.lineno,
                program.code(stmt),
            )
    return program


def _line(source: str, line: int) -> str:
    lines = code_lines(source)
    return lines[line - 1].strip() if 0 < line <= len(lines) else ""


def _check_statement(stmt: ast.stmt, source: str, which: str, top: bool) -> int:
    """The statement kinds a forward / backward may hold; returns how many statements."""

    def refuse(message: str, node: ast.AST = stmt) -> None:
        err = FormulaError(f"`{source_segment(source, node)[:120]}`: {message}", "not_allowed")
        err.node_line = getattr(node, "lineno", stmt.lineno)
        raise err

    if isinstance(stmt, ast.Expr):
        if is_cmp(stmt):
            return 0  # a notebook's own check line: Broadprop checks every gradient itself
        if not _is_write_call(stmt.value):
            refuse(
                f"a line of the {which} assigns a name (`name = expression`), appends to a "
                "list (`hs.append(h)`) or writes in place (`dW.index_add_(0, ids, dY)`)"
            )
        return 1
    if isinstance(stmt, ast.Assign):
        _check_targets(stmt.targets, refuse, allow_index=True)
        return 1
    if isinstance(stmt, ast.AugAssign):
        if type(stmt.op) not in AUG:
            refuse("in-place forms are += -= *= /=")
        _check_targets([stmt.target], refuse, allow_index=True, allow_tuple=False)
        return 1
    if isinstance(stmt, ast.For):
        if stmt.orelse:
            refuse("a loop has no else")
        if not isinstance(stmt.target, ast.Name):
            refuse("a loop runs one name over range(...): `for i in range(n):`")
        it = stmt.iter
        if _calls(it, "reversed") and len(it.args) == 1:
            it = it.args[0]
        if not _calls(it, "range"):
            refuse("a loop runs over range(...) or reversed(range(...)) only: "
                   "`for i in range(n):`")  # fmt: skip
        return 1 + sum(_check_statement(s, source, which, top=False) for s in stmt.body)
    refuse("not a statement a program takes")
    return 0


def _calls(node: ast.expr, name: str) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name


def _is_write_call(node: ast.expr) -> bool:
    """`hs.append(h)` or an in-place method `x.index_add_(...)` called on something."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and (node.func.attr == "append" or node.func.attr.endswith("_"))
        and not node.func.attr.startswith("_")
    )


def is_cmp(stmt: ast.stmt) -> bool:
    """`cmp('logits', dlogits, logits)`, as makemore's notebook checks each gradient."""
    value = getattr(stmt, "value", None)
    return (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Name)
        and value.func.id in CHECK_CALLS
    )


def _check_lines(body: tuple[ast.stmt, ...] | list[ast.stmt]) -> frozenset[ast.stmt]:
    found: set[ast.stmt] = set()
    for stmt in body:
        if is_cmp(stmt):
            found.add(stmt)
        elif isinstance(stmt, ast.For):
            found |= _check_lines(stmt.body)
    return frozenset(found)


# names a program reads but never assigns: the namespaces and builtins the language calls
RESERVED = {
    **{space: f"the module `{space}`" for space in NAMESPACES},
    **{name: f"Python's `{name}`" for name in BUILTINS},
}


def _check_targets(
    targets: list[ast.expr], refuse: Callable, allow_index: bool, allow_tuple: bool = True
) -> None:
    if len(targets) != 1:
        refuse("one assignment per line (`a = b = ...` is two)")
    target = targets[0]
    for name in _bound(target):  # a module or builtin keeps its meaning (Python would rebind
        if name.id in RESERVED:  # it; the server would not); an index may still read range(n)
            refuse(f"`{name.id}` is {RESERVED[name.id]}, which the program calls; name your "
                   "tensor something else", target)  # fmt: skip
    if isinstance(target, ast.Tuple) and allow_tuple:
        if not all(isinstance(e, ast.Name) or _is_grad_target(e) for e in target.elts) or not (
            2 <= len(target.elts) <= MAX_UNPACK
        ):
            refuse(f"unpack into 2 to {MAX_UNPACK} plain names: `q, k, v = x.split(C, dim=2)`",
                   target)  # fmt: skip
        return
    if isinstance(target, ast.Name) or _is_grad_target(target):
        return
    if isinstance(target, ast.Subscript) and allow_index:
        if isinstance(target.value, ast.Name) or _is_grad_target(target.value):
            return
        refuse("index a name directly: `dx[i] = ...`", target)
    refuse("assign to a name, `name.g`, or `name[index]`", target)


def _bound(target: ast.expr) -> list[ast.Name]:
    """The names an assignment target binds or writes into (not those its index reads)."""
    parts = target.elts if isinstance(target, ast.Tuple) else [target]
    names = []
    for part in parts:
        while isinstance(part, (ast.Subscript, ast.Attribute)):
            part = part.value
        if isinstance(part, ast.Name):
            names.append(part)
    return names


def _is_grad_target(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "g" and isinstance(node.value, ast.Name)
