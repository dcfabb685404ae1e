"""Reading a formula: source text -> a checked tree, no tensor touched.

The only door from learner text to the server. `parse` reads the text with `ast.parse` (which
builds a tree and no code object) and walks every node against the allowlist
(`app.lab.allowlist`). Nothing outside it is reached, so nothing needs to be forbidden: there
is no `eval`, `exec` or `compile`.
"""

from __future__ import annotations

import ast
import re
import threading
from dataclasses import dataclass
from functools import lru_cache

from app.lab.allowlist import (
    ATTRIBUTES,
    DTYPES,
    FUNCTIONAL,
    LIST_METHODS,
    MATH_CONSTANTS,
    METHODS,
    NAMESPACES,
    NODES,
    PAIR_ATTRIBUTES,
    TORCH_FUNCTIONS,
    FormulaError,
)

MAX_SOURCE_CHARS = 2000
MAX_STATEMENTS = 24
MAX_NODES = 600
MAX_DEPTH = 40
_PARSE_LOCK = threading.Lock()  # parse: one ast.parse at a time

# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Formula:
    """A checked formula: `locals` are `name = expr` lines, then the final expression."""

    key: str  # "x.g"
    source: str
    locals: tuple[tuple[str, ast.expr], ...]
    result: ast.expr

    @property
    def grad(self) -> str:
        return self.key.removesuffix(".g")


def parse(key: str, source: str) -> Formula:
    """Read and check a formula against the allowlist; no tensor is touched."""
    if len(source) > MAX_SOURCE_CHARS:
        raise FormulaError(
            f"the formula is {len(source)} characters long; at most {MAX_SOURCE_CHARS}",
            "too_long",
        )
    if not source.strip():
        raise FormulaError("the formula is empty", "syntax")
    try:
        # a tree only: ast.parse creates no code object and runs nothing. One at a time:
        # 3.11's AST constructor keeps its depth in shared state (SystemError in threads)
        with _PARSE_LOCK:
            try:
                tree = ast.parse(source, mode="exec")
            except SystemError:  # a library's parse in another thread overlapped: once more
                tree = ast.parse(source, mode="exec")
    except SyntaxError as err:
        where_ = f" (line {err.lineno}, column {err.offset})" if err.lineno else ""
        raise FormulaError(f"syntax error{where_}: {err.msg}", "syntax") from None
    except (ValueError, MemoryError, RecursionError, SystemError) as err:
        raise FormulaError(f"the formula cannot be read: {err}", "syntax") from None
    check_tree(tree, source)
    body = tree.body
    if not body:
        raise FormulaError("the formula is empty", "syntax")
    if len(body) > MAX_STATEMENTS:
        raise FormulaError(f"at most {MAX_STATEMENTS} lines, got {len(body)}", "too_long")
    local_lines: list[tuple[str, ast.expr]] = []
    for stmt in body[:-1]:
        if isinstance(stmt, ast.Assign) and _single_name_target(stmt):
            local_lines.append((stmt.targets[0].id, stmt.value))
        elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and _is_grad(stmt.targets[0]):
            # `xhat.g = ...`: a local's gradient, as the built-in formulas write them
            local_lines.append((f"{stmt.targets[0].value.id}.g", stmt.value))
        else:
            raise FormulaError(
                f"`{source_segment(source, stmt)}`: every line but the last must be "
                "`name = expression` (or `local.g = expression`)",
                "not_allowed",
            )
    last = body[-1]
    if isinstance(last, ast.Expr):
        result = last.value
    elif isinstance(last, ast.Assign) and len(last.targets) == 1 and _is_grad(last.targets[0]):
        target = f"{last.targets[0].value.id}.g"
        if target != key:
            raise FormulaError(
                f"this formula is for {key}, but its last line sets {target}", "name"
            )
        result = last.value
    else:
        raise FormulaError(
            f"the last line must be the gradient: an expression, or `{key} = expression`",
            "not_allowed",
        )
    return Formula(key, source, tuple(local_lines), result)


def _single_name_target(stmt: ast.Assign) -> bool:
    return len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)


def _is_grad(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "g" and isinstance(node.value, ast.Name)


def check_tree(
    tree: ast.AST,
    source: str,
    nodes: frozenset[type] = NODES,
    max_nodes: int = MAX_NODES,
    program: bool = False,
) -> None:
    """Every node, iteratively (a deep tree cannot overflow our stack), against the allowlist,
    in source order: with several bad lines, the first one is named."""
    stack: list[tuple[ast.AST, int]] = [(tree, 0)]
    count = 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > max_nodes:
            raise FormulaError(f"the text has over {max_nodes} parts; simplify it", "too_long")
        if depth > MAX_DEPTH:
            raise FormulaError(f"the text nests over {MAX_DEPTH} levels deep", "too_long")
        if type(node) not in nodes:
            raise FormulaError(_not_allowed_message(node, source, program), "not_allowed")
        _check_node(node, source, program)
        children = list(ast.iter_child_nodes(node))
        stack.extend((child, depth + 1) for child in reversed(children))


def _check_node(node: ast.AST, source: str, program: bool = False) -> None:
    if isinstance(node, ast.Name) and node.id.startswith("_"):
        raise FormulaError(f"`{node.id}`: names starting with _ are not allowed", "not_allowed")
    if isinstance(node, ast.Attribute):
        if node.attr.startswith("_"):
            raise FormulaError(
                f"`{source_segment(source, node)}`: private and dunder attributes are not allowed",
                "not_allowed",
            )
        if isinstance(node.value, ast.Name) and node.value.id in NAMESPACES:
            space = node.value.id
            if node.attr not in NAMESPACES[space] and not (
                space == "torch"
                and node.attr in DTYPES
                or space == "math"
                and node.attr in MATH_CONSTANTS
            ):
                allowed = ", ".join(f"{space}.{n}" for n in NAMESPACES[space])
                raise FormulaError(
                    f"`{source_segment(source, node)}` is not allowed; allowed: {allowed}",
                    "not_allowed",
                )
        allowed = {"g", *METHODS, *ATTRIBUTES, *PAIR_ATTRIBUTES, *TORCH_FUNCTIONS, *FUNCTIONAL,
                   *DTYPES, *LIST_METHODS, *NAMESPACES["math"], *MATH_CONSTANTS}  # fmt: skip
        if node.attr not in allowed:
            raise FormulaError(_unknown_attribute(node, source), "not_allowed")
    if isinstance(node, ast.Constant) and not (
        node.value is None
        or node.value is Ellipsis
        or isinstance(node.value, (int, float, str))
        and not isinstance(node.value, complex)
    ):
        raise FormulaError(
            f"`{source_segment(source, node)}`: only numbers, None and ... are allowed",
            "not_allowed",
        )
    if isinstance(node, ast.Compare) and len(node.ops) != 1:
        raise FormulaError(
            f"`{source_segment(source, node)}`: one comparison at a time", "not_allowed"
        )
    if isinstance(node, ast.keyword) and node.arg is None:
        raise FormulaError("`**` arguments are not allowed", "not_allowed")
    if program:
        return  # a program's statements are checked by app.lab.statements
    if isinstance(node, ast.Assign) and not (
        _single_name_target(node) or (len(node.targets) == 1 and _is_grad(node.targets[0]))
    ):
        if any(isinstance(t, ast.Subscript) for t in node.targets):
            raise FormulaError(
                f"`{source_segment(source, node)}`: indexed assignment is for programs (POST "
                "/api/program, the page's /program); in a formula, build the tensor at once, "
                "e.g. `probs - F.one_hot(target, num_classes=probs.shape[-1])` for "
                "`d = probs; d[range(n), target] -= 1`",
                "not_allowed",
            )
        raise FormulaError(
            f"`{source_segment(source, node)}`: assign to one plain name", "not_allowed"
        )


def _not_allowed_message(node: ast.AST, source: str, program: bool = False) -> str:
    what, advice = _REFUSED.get(type(node), (type(node).__name__, ""))
    where = "a program" if program else "a formula"
    if not program and isinstance(node, ast.AugAssign):
        advice = (
            "write `x = x + ...`, or write the whole backward as a program (POST /api/program, "
            "the page's /program), where `+=` accumulates as in a notebook"
        )
    segment = source_segment(source, node)
    prefix = f"`{segment}`: " if segment and len(segment) <= 80 else ""
    return f"{prefix}{what} not allowed in {where}" + (f": {advice}" if advice else "")


# node type -> (what it is, what to write instead)
_REFUSED: dict[type, tuple[str, str]] = {
    ast.Import: ("imports are", ""),
    ast.ImportFrom: ("imports are", ""),
    ast.Lambda: ("lambdas are", ""),
    ast.ListComp: ("comprehensions are", ""),
    ast.SetComp: ("comprehensions are", ""),
    ast.DictComp: ("comprehensions are", ""),
    ast.GeneratorExp: ("generators are", ""),
    ast.JoinedStr: ("f-strings are", ""),
    ast.AugAssign: ("in-place assignment (`+=` and the like) is", ""),
    ast.For: ("a loop is", "programs loop with `for i in range(n):` (POST /api/program)"),
    ast.While: ("`while` is", "a program loops only with `for i in range(n):`"),
    ast.NamedExpr: ("`:=` is", ""),
    ast.IfExp: ("`x if c else y` is", "use torch.where(c, x, y)"),
    ast.BoolOp: ("`and` / `or` are", "use a mask, e.g. (a > 0) * (b > 0)"),
}


def _unknown_attribute(node: ast.Attribute, source: str) -> str:
    name = node.attr
    if name.endswith("_"):
        out_of_place = name[:-1]
        if out_of_place in METHODS:  # `dC.index_add_(...)` has a form that returns the result
            owner = node.value.id if isinstance(node.value, ast.Name) else "x"
            return (
                f"`.{name}`: in-place methods (a trailing _) are not allowed: formulas never "
                f"write; assign the out-of-place form instead, `{owner} = {owner}.{out_of_place}(...)`"
            )
        return f"`.{name}`: in-place methods (a trailing _) are not allowed: formulas never write"
    if name in ("data", "numpy", "storage", "untyped_storage", "tolist", "item", "grad"):
        return f"`.{name}` is not allowed: formulas work on the traced tensors only"
    allowed = ", ".join(sorted({*METHODS, *ATTRIBUTES}))
    return f"`.{name}` is not an allowed method or attribute; allowed: {allowed}"


def source_segment(source: str, node: ast.AST) -> str:
    """The code of `node` as written. An ASCII source (the usual) is cut from its lines, split
    once per source: ast.get_source_segment splits the whole text on every call, which a
    training pays at every in-place write of every step."""
    if not _plain(source) or getattr(node, "end_lineno", None) is None:
        return (ast.get_source_segment(source, node) or "").strip()
    lines = source_lines(source)
    first, last = node.lineno - 1, node.end_lineno - 1
    if first == last:
        return lines[first][node.col_offset : node.end_col_offset].strip()
    parts = [lines[first][node.col_offset :], *lines[first + 1 : last],
             lines[last][: node.end_col_offset]]  # fmt: skip
    return "".join(parts).strip()


@lru_cache(maxsize=64)
def _plain(source: str) -> bool:
    """ASCII with no line breaks but CR and LF: str.splitlines numbers its lines as ast does."""
    return source.isascii() and not any(c in source for c in "\v\f\x1c\x1d\x1e")


def code_lines(source: str) -> list[str]:
    """The source's lines as ast numbers them, without their endings: only LF, CRLF and CR
    end a line (str.splitlines also breaks at a form feed, \x1c-\x1e, \x85 and \u2028,
    which would shift every later line's number)."""
    return _LINE_END.split(source)


_LINE_END = re.compile(r"\r\n|\r|\n")


@lru_cache(maxsize=64)
def source_lines(source: str) -> tuple[str, ...]:
    """The source's lines with their endings (as ast numbers them, for a `_plain` source)."""
    return tuple(source.splitlines(keepends=True))
