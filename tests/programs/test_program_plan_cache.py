"""A program's plan (its dry run on meta tensors) is kept for the same program posted again
(app/programs/admission.py): whatever a request only asks to be shown, and its seed, which
the dry run never reads (shapes, never numbers), reuse it; anything that changes the program
makes a new one."""

from __future__ import annotations

from app.programs import presets
from app.programs import run as programs_run
from app.programs.admission import admit_program
from app.programs.schemas import ProgramRequest
from app.settings import Settings

MAKEMORE = presets.preset("makemore")["request"]


def _admitted(**change):
    return admit_program(ProgramRequest.model_validate({**MAKEMORE, **change}), Settings())


def test_a_new_seed_or_view_reuses_the_plan_and_a_new_program_does_not():
    plan = _admitted(seed=11)
    assert _admitted(seed=12) is plan
    assert _admitted(seed=13, reference_heatmaps=True) is plan
    assert _admitted(seed=11, follow={"grad": "dW1", "index": [0, 0]}) is plan
    assert _admitted(seed=11, dtype="float64") is not plan
    assert _admitted(seed=11, backward=MAKEMORE["backward"] + "\nextra = dW1 * 2") is not plan


class _SeedUnread:
    """A request whose seed the dry run must never read."""

    def __init__(self, request: ProgramRequest) -> None:
        self._request = request

    def __getattr__(self, name: str):
        assert name != "seed", "the dry run read the seed"
        return getattr(self._request, name)


def test_the_dry_run_never_reads_the_seed():
    for preset in presets.PRESETS:
        request = ProgramRequest.model_validate(preset["request"])
        plan = programs_run.admit(_SeedUnread(request), 2**31, 30.0)
        assert plan.has_grad, preset["id"]
