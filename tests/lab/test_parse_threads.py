"""Formula parsing from many threads at once (issue 25, item 2).

CPython 3.11's AST constructor keeps its recursion depth in interpreter-wide state: two
threads converting trees at once (a thread switch inside the conversion, e.g. a collection
running a finalizer) raise `SystemError: AST constructor recursion depth mismatch`, which
would be a 503 for an innocent learner. `app.lab.parse.parse` serializes the parse."""

from __future__ import annotations

import ast
import sys
import threading
from types import SimpleNamespace

from app.lab import allowlist
from app.lab import parse as reading

# a long formula (within the 2,000 characters) of deep chains: many nested nodes for the constructor to walk
LONG = "\n".join(f"a{i} = x" + ".unsqueeze(0).squeeze(0)" * 9 for i in range(6)) + "\nx"


class _Cyclic:
    """Garbage that needs the cycle collector and runs Python code when collected: a thread
    switch can happen in the middle of another thread's tree conversion."""

    def __init__(self) -> None:
        self.me = self

    def __del__(self) -> None:
        pass


def test_parse_is_safe_from_many_threads(monkeypatch):
    # the app's dataset warm-up imports libraries that parse too (outside our lock): done first
    for thread in threading.enumerate():
        if thread.name == "broadprop-data-warm":
            thread.join(timeout=300)
    errors: list[BaseException] = []
    parsed = []
    real, guard, inside, most = ast.parse, threading.Lock(), [0], [0]

    def counted(*args, **kwargs):  # the real parse, counting how many run at once
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            return real(*args, **kwargs)
        finally:
            with guard:
                inside[0] -= 1

    monkeypatch.setattr(reading, "ast", SimpleNamespace(**{**vars(ast), "parse": counted}))

    def work() -> None:
        for _ in range(60):
            for _ in range(50):
                _Cyclic()
            try:
                parsed.append(reading.parse("x.g", LONG))
            except BaseException as e:  # noqa: BLE001 (collected, asserted below)
                errors.append(e)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=work) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        sys.setswitchinterval(old)
    assert errors == []
    assert len(parsed) == 6 * 60
    assert most == [1]  # never two parses at once


def test_a_system_error_while_parsing_is_a_formula_error(monkeypatch):
    def broken(*args, **kwargs):
        raise SystemError("AST constructor recursion depth mismatch (before=1, after=0)")

    # the parser's own view of the ast module, with a parse that fails as 3.11's can
    monkeypatch.setattr(reading, "ast", SimpleNamespace(**{**vars(ast), "parse": broken}))
    try:  # (it fails twice: parse tries once more)
        reading.parse("x.g", "x")
    except allowlist.FormulaError as err:
        assert "cannot be read" in str(err)
    else:
        raise AssertionError("no FormulaError")
