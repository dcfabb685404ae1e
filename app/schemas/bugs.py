"""GET /api/bugs: the classic mistakes, each a formula to send."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    Field,
)


class Bug(BaseModel):
    """One classic mistake: send {"formulas": {grad: formula}} with the article's defaults."""

    id: str
    title: str
    grad: str = Field(description='The gradient it computes, e.g. "x.g"')
    formula: str
    kind: Literal["shape", "value", "silent"] = Field(
        description="shape: refused with a shape error; value: runs and fails the check; "
        "silent: fails the check but passes the article's is_same (no abs())"
    )
    lesson: str
