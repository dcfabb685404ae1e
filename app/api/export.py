"""POST /api/export: a run as a runnable Python script or a Jupyter notebook."""

from fastapi import APIRouter
from fastapi.responses import Response

from app import export
from app.schemas import ExportRequest

router = APIRouter(tags=["export"])
VALIDATION_ERROR = "#/components/schemas/HTTPValidationError"


@router.post(
    "/api/export",
    response_class=Response,
    summary="A run as a runnable Python script or a Jupyter notebook",
    description="The file makes the run's tensors, runs the forward pass, the manual backward "
    "pass (the formulas the run traces, one statement per line with its shapes) and autograd, "
    "prints `loss <value>` and a check table, and (the script) exits 0 exactly when every "
    "gradient matches. Sent as an attachment.",
    responses={
        200: {
            "description": "The file, with Content-Disposition: attachment; filename=...",
            "content": {
                media: {"schema": {"type": "string"}} for media in export.MEDIA_TYPES.values()
            },
        },
        422: {
            "description": "A bad config or format",
            "content": {"application/json": {"schema": {"$ref": VALIDATION_ERROR}}},
        },
    },
)
def export_run(request: ExportRequest | None = None) -> Response:
    request = request or ExportRequest()
    text, name = export.export(request.config, request.format)
    return Response(
        text,
        media_type=export.MEDIA_TYPES[request.format],
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
