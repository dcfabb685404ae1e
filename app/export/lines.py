"""A trace's statements as lines of the file: each with its shapes as a comment, in the
article's style, made from its trace steps (`shape_comment`); and `Section`, one notebook cell
pair (markdown, code)."""

from __future__ import annotations

import ast
import inspect
import io
import re
import textwrap
import tokenize
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

# how a binary step's operator is written in a shape comment
SYMBOLS = {"mul": "*", "div": "/", "add": "+", "sub": "-", "matmul": "@", "eq": "==", "gt": ">"}
SHAPE_ONLY = ("unsqueeze", "squeeze", "reshape")
# The learner's own names (a formula's locals) live in this namespace in the file: as bare
# names they could hide what the file itself uses (`sys`, `F`, `print`, `max`, `compare`, a
# later formula's local of the same name); as attributes they cannot.
YOURS = "yours"


# --------------------------------------------------------------------------- pieces


def shape_text(shape: Sequence[int]) -> str:
    """As the article writes shapes: `(1000, 784, 50)`, `(50,)`, `()`."""
    return repr(tuple(shape))


@dataclass
class Section:
    """One notebook cell's worth: a heading and explanation, and the code (with comments)."""

    title: str
    markdown: str = ""
    code: list[str] = field(default_factory=list)


def with_comment(code: str, comment: str) -> str:
    return f"{code}  # {comment}" if comment else code


def call_suffix(expr: str) -> str:
    """The method call that ends an expression: `(a * b).sum(-1)` -> `sum(-1)`."""
    expr = expr.removesuffix(".values")
    if not expr.endswith(")"):
        return ""
    depth = 0
    for i in range(len(expr) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(expr[i], 0)
        if depth == 0:
            head = re.search(r"\.?([A-Za-z_][A-Za-z_0-9]*)$", expr[:i])
            return f"{head.group(1)}{expr[i:]}" if head else ""
    return ""


def _feeds_binary(steps: Sequence[dict[str, Any]], i: int) -> bool:
    """Whether step i's output is an operand of the next op that is not a shape change."""
    for step in steps[i + 1 :]:
        if step["action"] not in SHAPE_ONLY:
            return len(step["inputs"]) >= 2 and steps[i]["output"] in step["inputs"]
    return False


def shape_comment(steps: Sequence[dict[str, Any]], result: Sequence[int]) -> str:
    """A statement's shapes from its trace steps, in the article's style:
    `(1000, 1, 50) * (784, 50) -> (1000, 784, 50) -> sum(-1) -> (1000, 784)`.

    Broadcasts and other binary ops show both operands; reductions and shape changes chain
    on; an unsqueeze that only feeds the next binary op shows as that op's operand; ops that
    keep the shape (scales, masks, exp, ...) are left out."""
    segments: list[str] = []
    last: list[int] | None = None
    for i, step in enumerate(steps):
        inputs, out, op = step["inputs"], step["output"], step["op"]
        if len(inputs) >= 2:
            if op in SYMBOLS and len(inputs) == 2:
                text = f"{shape_text(inputs[0])} {SYMBOLS[op]} {shape_text(inputs[1])}"
            else:
                text = f"{op}({', '.join(map(shape_text, inputs))})"
            segments.append(f"{text} -> {shape_text(out)}")
        elif step["action"] == "reduce" or step["action"] in SHAPE_ONLY or inputs[0] != out:
            if step["action"] in SHAPE_ONLY and _feeds_binary(steps, i):
                continue  # shown as the next binary op's operand
            call = call_suffix(step["expr"]) or op
            if last is not None and segments and last == inputs[0]:
                segments[-1] += f" -> {call} -> {shape_text(out)}"
            else:
                segments.append(f"{shape_text(inputs[0])} -> {call} -> {shape_text(out)}")
        else:
            continue
        last = out
    if not segments:
        return shape_text(result)
    if last != list(result):
        segments[-1] += f" -> {shape_text(result)}"
    return "; ".join(segments)


@dataclass
class Stmt:
    """One statement of a trace entry's code, with the trace steps it ran."""

    target: str  # `xc`, `x.g`
    expr: str
    steps: list[dict[str, Any]]
    result: list[int] | None  # its shape (None: a binding whose steps the trace lacks)

    @property
    def line(self) -> str:
        return f"{self.target} = {self.expr}"

    def commented(self, target: str | None = None) -> str:
        """The statement with its shapes as a comment, optionally into another target."""
        code = f"{target or self.target} = {self.expr}"
        if self.result is None:
            return code
        return with_comment(code, shape_comment(self.steps, self.result))


def statements(code: str, steps: Sequence[dict[str, Any]], shape: Sequence[int]) -> list[Stmt]:
    """A trace entry's code as statements, each with its own steps.

    The code is the bindings (`name = expr`, whose last step the trace tags with the name)
    and then the entry's own `target = expr`; the steps, in execution order, are split at
    each binding's named step, the rest belonging to the last statement."""
    lines = code.split("\n")
    parsed = [tuple(part.strip() for part in line.split(" = ", 1)) for line in lines]
    names = [target for target, _ in parsed[:-1]]
    groups: list[list[dict]] = [[] for _ in lines]
    results: list[list[int] | None] = [None for _ in lines]
    current = 0
    for step in steps:
        groups[current].append(step)
        named = step.get("name")
        if named in names[current:]:
            index = names.index(named, current)
            if index != current:  # steps before it belong to it too
                groups[index].extend(groups[current])
                groups[current] = []
            results[index] = step["output"]
            current = index + 1
    results[-1] = list(shape)
    return [
        Stmt(target, expr, group, result)
        for (target, expr), group, result in zip(parsed, groups, results)
    ]


NAME = re.compile(rf"(?:{YOURS}\.)?[A-Za-z_]\w*(?:\.g\b)?")


class Emitter:
    """Writes statements in order, leaving out a binding whose name already holds the same
    expression of the same values (the backward recomputes the forward's intermediates;
    the script reuses them, as the article does)."""

    def __init__(self) -> None:
        self.holds: dict[str, str] = {}  # name -> the expression it holds now
        self.written: list[str] = []  # every statement, in order, without its comment

    def fresh(self, stmt: Stmt) -> bool:
        return self.holds.get(stmt.target) != stmt.expr

    def assigned(self, target: str, expr: str) -> None:
        base = target.removesuffix(".g")
        for name, held in list(self.holds.items()):
            uses = set(NAME.findall(held))
            if (
                name == target
                or target in uses
                or (base == target and (name == f"{base}.g" or f"{base}.g" in uses))
            ):
                del self.holds[name]
        self.holds[target] = expr
        self.written.append(f"{target} = {expr}")


# --------------------------------------------------------------------------- embedded code


def module_body(module: ModuleType) -> list[str]:
    """A module's own source after its docstring and imports (`inspect.getsource`): the code
    an exported file carries, so the file runs what Broadprop runs and tests, not a copy. The
    module imports nothing the file does not define before it (tests/export check each)."""
    source = inspect.getsource(module)
    tree = ast.parse(source)
    head = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    start = max(node.end_lineno for node in head) if head else 0
    return _strip(source.split("\n")[start:])


def _strip(lines: list[str]) -> list[str]:
    while lines and not lines[0].strip():
        lines = lines[1:]
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


def framed(frame: Callable, **marks: str | list[str]) -> list[str]:
    """A frame's source (app/export/frames.py, `inspect.getsource`) with its marks filled: a
    line that is a mark alone gets the mark's lines (a list), indented as the mark; a mark
    inside a line is replaced by its text (a str; a later line of it indented as that line).
    Every mark given must be in the frame, and every mark in the frame given."""
    source = textwrap.dedent(inspect.getsource(frame)).rstrip("\n")
    lines = source.split("\n")
    known = set(getattr(inspect.getmodule(frame), "MARKS", ())) | set(marks)
    used: set[str] = set()
    inline: dict[int, list[tuple[int, int, str]]] = {}  # row -> (start, end, text), in order
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.string in known:
            used.add(tok.string)
            inline.setdefault(tok.start[0] - 1, []).append((tok.start[1], tok.end[1], tok.string))
    if used != set(marks):
        absent, unfilled = sorted(set(marks) - used), sorted(used - set(marks))
        raise ValueError(f"{frame.__name__}: marks not in it {absent}, marks not given {unfilled}")
    out: list[str] = []
    for row, line in enumerate(lines):
        indent = line[: len(line) - len(line.lstrip())]
        found = inline.get(row, [])
        if len(found) == 1 and line.strip() == found[0][2]:
            block = marks[found[0][2]]
            if not isinstance(block, list):
                raise ValueError(f"{found[0][2]} stands alone in {frame.__name__}: give it lines")
            out += textwrap.indent("\n".join(block), indent).split("\n") if block else []
            continue
        for start, end, mark in reversed(found):
            text = marks[mark]
            if not isinstance(text, str):
                raise ValueError(f"{mark} is inside a line of {frame.__name__}: give it text")
            line = line[:start] + text.replace("\n", "\n" + indent) + line[end:]
        out += line.split("\n")
    return out
