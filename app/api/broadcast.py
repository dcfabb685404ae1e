"""POST /api/broadcast: the broadcasting rule for two shapes, forward and backward."""

from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError

from app.ops.broadcast import BroadcastError, broadcast_rule
from app.schemas import BroadcastRequest, BroadcastResponse, ErrorMessage

router = APIRouter(tags=["broadcast"])


@router.post(
    "/api/broadcast",
    response_model=BroadcastResponse,
    summary="How two shapes broadcast, and which dims a gradient sums over to undo it",
    responses={
        403: {"model": ErrorMessage, "description": "A request from another origin"},
        413: {"model": ErrorMessage, "description": "A body over BROADPROP_MAX_BODY_BYTES"},
        415: {"model": ErrorMessage, "description": "A body not sent as application/json"},
    },
)
def broadcast(request: BroadcastRequest) -> dict:
    try:
        rule = broadcast_rule(request.a, request.b)
    except BroadcastError as err:
        raise RequestValidationError(
            [
                {
                    "type": "broadcast_incompatible",
                    "loc": ("body",),
                    "msg": str(err),
                    "input": {"a": request.a, "b": request.b},
                    "ctx": {"dim": err.dim, "a": err.a, "b": err.b},
                }
            ]
        ) from None
    return rule.as_dict()
