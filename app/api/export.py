"""POST /api/export: a run as a runnable Python script or a Jupyter notebook."""

from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from app import export
from app.lab import formulas
from app.lab.evaluator import FormulaError
from app.lab.formulas import UnknownGradient
from app.schemas import ExportRequest

router = APIRouter(tags=["export"])
VALIDATION_ERROR = "#/components/schemas/HTTPValidationError"


@router.post(
    "/api/export",
    response_class=Response,
    summary="A run as a runnable Python script or a Jupyter notebook",
    description="The file makes the run's tensors, runs the forward pass, the manual backward "
    "pass (the formulas the run traces, the learner's included, one statement per line with "
    "its shapes) and autograd, prints `loss <value>` and a check table, and (the script) exits "
    "0 exactly when every gradient matches. Sent as an attachment.",
    responses={
        200: {
            "description": "The file, with Content-Disposition: attachment; filename=...",
            "content": {
                media: {"schema": {"type": "string"}} for media in export.MEDIA_TYPES.values()
            },
        },
        422: {
            "description": "A bad config or format, or a learner's formula that cannot run "
            '(at ["body", "config", "formulas", "<name>.g"])',
            "content": {"application/json": {"schema": {"$ref": VALIDATION_ERROR}}},
        },
    },
)
def export_run(request: ExportRequest | None = None) -> Response:
    request = request or ExportRequest()
    cfg = request.config
    try:
        text, name = export.export(cfg, request.format)
    except (FormulaError, UnknownGradient) as err:
        _refuse(err, cfg.formulas)
    return Response(
        text,
        media_type=export.MEDIA_TYPES[request.format],
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


def _refuse(err: FormulaError | UnknownGradient, sources: dict[str, str]) -> None:
    """The run's 422 for a formula, located under `config`."""
    try:
        formulas.refuse(err, sources)
    except RequestValidationError as exc:
        errors = [{**e, "loc": ("body", "config", *e["loc"][1:])} for e in exc.errors()]
        raise RequestValidationError(errors) from None
