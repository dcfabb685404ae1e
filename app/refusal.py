"""A refusal raised by the core (the cost gate, the formula lab, follow, programs), in the shape
of FastAPI's 422 errors but without the web stack: the edge (app/server) answers it as a 422,
a notebook prints it. The core never imports FastAPI (tests/test_layout.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class Refused(ValueError):
    """What the request asked is refused: `errors()` lists each reason as FastAPI's validation
    errors do ({type, loc, msg, input, ctx}), `loc` naming the field to change."""

    def __init__(self, errors: Sequence[dict[str, Any]]) -> None:
        self._errors = list(errors)
        super().__init__("; ".join(str(e.get("msg", "")) for e in self._errors))

    def errors(self) -> list[dict[str, Any]]:
        return self._errors

    def relocated(self, *prefix: Any) -> Refused:
        """The same refusal with each `loc` moved under `prefix` in place of its first part
        ("body"): an export's embedded program answers at ["body", "program", ...]."""
        return Refused([{**e, "loc": (*prefix, *tuple(e["loc"])[1:])} for e in self._errors])
