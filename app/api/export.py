"""POST /api/export: a run as a runnable Python script or a Jupyter notebook."""

from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api import gate, sandboxed
from app.api.responses import VALIDATION_ERROR
from app.export import run as export
from app.ops.cancel import CancelToken, RunCancelled
from app.programs import admission as program_admission
from app.refusal import Refused
from app.schemas import ErrorMessage, ExportRequest
from app.server.lanes import Stopped
from app.settings import Settings

router = APIRouter(tags=["export"])


@router.post(
    "/api/export",
    response_class=Response,
    summary="A run as a runnable Python script or a Jupyter notebook",
    description="The file makes the run's tensors, runs the forward pass, the manual backward "
    "pass (the formulas the run traces, the learner's included, one statement per line with "
    "its shapes) and autograd, prints `loss <value>` and a check table, and (the script) exits "
    "0 exactly when every gradient matches. Sent as an attachment. A config is accepted "
    "exactly when POST /api/run accepts it.",
    responses={
        403: {"model": ErrorMessage, "description": "A request from another origin"},
        415: {"model": ErrorMessage, "description": "A body not sent as application/json"},
        413: {
            "model": ErrorMessage,
            "description": "A body over 1 MiB (a program's value inputs take room)",
        },
        200: {
            "description": "The file, with Content-Disposition: attachment; filename=...",
            "content": {  # a notebook is a JSON document (nbformat 4), a script text
                export.MEDIA_TYPES["py"]: {"schema": {"type": "string"}},
                export.MEDIA_TYPES["ipynb"]: {
                    "schema": {"type": "object", "required": ["cells", "metadata", "nbformat"]}
                },
            },
        },
        422: {
            "description": "A bad format, or a config that POST /api/run refuses (a field out "
            "of its limits, over the memory budget or the work limits, a formula that cannot "
            'run), located under "config"',
            "content": {"application/json": {"schema": {"$ref": VALIDATION_ERROR}}},
        },
    },
)
async def export_run(http: Request, request: ExportRequest | None = None) -> Response:
    request = request or ExportRequest()
    settings: Settings = http.app.state.settings
    if request.program is not None:
        return await export_program_body(request.program, request.format, settings)
    try:  # what the run would refuse (formulas dry-run on meta tensors: nothing allocated)
        await gate.admitted(http, request.config)
    except Refused as refused:
        raise refused.relocated("body", "config") from None
    text, name = await anyio.to_thread.run_sync(
        export.export, request.config, request.format, request.hide
    )
    return Response(
        text,
        media_type=export.MEDIA_TYPES[request.format],
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


async def export_program_body(body: dict, fmt: str, settings: Settings) -> Response:
    """A program's file; its body validated as POST /api/program's, errors under "program"."""
    from pydantic import ValidationError

    from app.export import program as program_export
    from app.programs.schemas import ProgramRequest

    watch = CancelToken()  # the dry run under the run deadline (its thread's CPU time)
    watch.arm(settings.run_deadline_s)

    def validated() -> tuple[ProgramRequest, Any]:  # off the event loop: up to 1 MiB of values
        try:
            program = ProgramRequest.model_validate(body)
        except ValidationError as exc:
            errors = [{**e, "loc": ("body", "program", *e["loc"])} for e in exc.errors()]
            raise Refused(errors) from None
        try:
            return program, program_admission.admit_program_watched(program, settings, watch)
        except Refused as refused:
            raise refused.relocated("body", "program") from None

    try:
        program, plan = await anyio.to_thread.run_sync(validated)
    except RunCancelled:
        raise Stopped("deadline", settings.run_deadline_s, sandboxed.PROGRAM_ADVICE) from None
    text, name = program_export.export(program, plan, fmt)
    return Response(
        text,
        media_type=program_export.MEDIA_TYPES[fmt],
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
