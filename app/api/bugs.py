"""GET /api/bugs: the gallery of classic mistakes in backward formulas."""

from fastapi import APIRouter

from app.lab.bugs import gallery
from app.schemas import Bug

router = APIRouter(tags=["lab"])


@router.get(
    "/api/bugs",
    response_model=list[Bug],
    summary="Classic mistakes in the article's backward formulas, each a formula to try",
)
async def bugs() -> list[dict[str, str]]:
    return gallery()
