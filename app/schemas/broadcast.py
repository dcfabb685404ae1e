"""POST /api/broadcast: two shapes in, the broadcast rule out."""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
)

from app.schemas.run import Shape


class BroadcastRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    a: Annotated[list[Annotated[int, Field(strict=True, ge=1, le=2**31)]], Field(max_length=8)]
    b: Annotated[list[Annotated[int, Field(strict=True, ge=1, le=2**31)]], Field(max_length=8)]


class OperandBroadcast(BaseModel):
    aligned: Shape
    expanded: list[int]
    grad_sum_dims: list[int]


class BroadcastResponse(BaseModel):
    result: Shape
    a: OperandBroadcast
    b: OperandBroadcast
