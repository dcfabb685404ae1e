"""Python's own functions a formula or program calls: `range`, `len`, `float('-inf')`, `int`,
`reversed(range(T))`, each on what it means in Python and bounded (a range at most
`MAX_RANGE` long). A mixin of the expression evaluator (`app.lab.evaluator.Evaluator`)."""

from __future__ import annotations

import ast
import math
from typing import Any

from app.lab.allowlist import MAX_RANGE, is_int, is_number
from app.ops.traced import Traced


class PythonBuiltins:
    """`_builtin(node, name)`: the evaluator's `fail`, `eval` and `_argument` do the rest."""

    def _builtin(self, node: ast.Call, name: str) -> Any:
        """Python's own: range, len, float, int, reversed."""
        if name == "range":
            return self._range(node)
        if node.keywords or len(node.args) != 1:
            self.fail(node, f"{name}() takes one argument here", "not_allowed")
        arg = self._argument(node.args[0])
        if name == "len":
            if isinstance(arg, Traced):
                if arg.ndim == 0:
                    self.fail(node, "len() of a 0-d tensor", "not_allowed")
                return arg.shape[0]
            if isinstance(arg, (list, tuple, range)):
                return len(arg)
            self.fail(node, "len() takes a tensor, a list or a shape", "not_allowed")
        if name == "reversed":
            if not isinstance(arg, range):
                self.fail(node, "reversed() takes a range here: reversed(range(T))", "not_allowed")
            return arg[::-1]
        if name == "float":
            if isinstance(arg, str):
                text = arg.strip().lower()
                if text not in ("inf", "-inf", "+inf", "nan", "infinity", "-infinity"):
                    self.fail(node, "float() takes a number, or 'inf', '-inf', 'nan'",
                              "not_allowed")  # fmt: skip
                return float(text)
            if is_number(arg):
                return float(arg)
            self.fail(node, "float() takes a number, or 'inf', '-inf', 'nan'", "not_allowed")
        if is_number(arg) and math.isfinite(arg):  # int()
            return int(arg)
        self.fail(node, "int() takes a finite number", "not_allowed")

    def _range(self, node: ast.Call) -> range:
        """`range(n)`, `range(start, stop[, step])`: a Python range (a loop's or an index's)."""
        if node.keywords or not 1 <= len(node.args) <= 3:
            self.fail(node, "range takes n, or start, stop[, step]", "not_allowed")
        args = [self.eval(a) for a in node.args]
        if not all(is_int(a) for a in args):
            self.fail(node, "range takes whole numbers (a shape's size: x.shape[0])",
                      "not_allowed")  # fmt: skip
        if len(args) == 3 and args[2] == 0:
            self.fail(node, "range's step cannot be 0", "not_allowed")
        r = range(*args)
        if len(r) > MAX_RANGE:
            self.fail(node, f"range of {len(r)} numbers; at most {MAX_RANGE}", "budget")
        return r
