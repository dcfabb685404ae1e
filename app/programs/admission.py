"""A program's admission: the dry run on meta tensors (app/programs/plan.py), its plan kept
for the program posted again, and a refusal at the program's line (app/refusal.py `Refused`,
turned into a 422 at the edge)."""

from __future__ import annotations

from functools import lru_cache

from app.cost.work import WORK_LIMIT_S
from app.ops.cancel import CancelToken, cancel_token
from app.programs import run as programs
from app.programs.schemas import ProgramRequest
from app.refusal import Refused


def admit_program(request: ProgramRequest, settings) -> programs.Plan:
    """The dry run on meta tensors: a 422 at the line for anything refused. An accepted
    program's plan is kept (the page posts the same program again as its views change)."""
    try:
        plan = _program_plan(request.model_dump_json(exclude=PLAN_FREE_FIELDS),
                             settings.memory_budget_bytes)  # fmt: skip
        if request.follow is not None:  # a click on another element: the same plan
            programs.admit_follow(request, plan)
        return plan
    except programs.ProgramRefused as err:
        refuse_program(err)


# what the dry run never reads: what a request asks to be shown, and the seed (the dry run
# is on meta tensors: shapes only, never numbers). The same program's plan serves them all: the
# page posts the same program again as its views change, or with a new seed
PLAN_FREE_FIELDS = frozenset({"follow", "reference_heatmaps", "seed"})


@lru_cache(maxsize=64)  # a plan holds its program's trace: shapes and steps, tens of KB
def _program_plan(body: str, memory_budget: int) -> programs.Plan:
    request = ProgramRequest.model_validate_json(body)
    return programs.admit(request, memory_budget, WORK_LIMIT_S)


def refuse_program(err: programs.ProgramRefused) -> None:
    """A program's refusal: a 422 at its line (`body.forward.<n>` or `body.backward.<n>`)."""
    raise Refused(
        [
            {
                "type": f"program_{err.kind}",
                "loc": ("body", err.which, err.line),
                "msg": str(err),
                "input": None,
                "ctx": {"kind": err.kind, "line": err.line, **err.ctx},
            }
        ]
    )


def admit_program_watched(request: ProgramRequest, settings, cancel: CancelToken) -> programs.Plan:
    """`admit_program` under `cancel` (the run deadline): the dry run polls it between
    statements."""
    with cancel_token(cancel):
        return admit_program(request, settings)
