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


def test_a_plans_forward_is_walked_once_for_every_gradients_uses(monkeypatch):
    """A failing program's hints ask each failing gradient's forward uses
    (app/programs/slips.py `tensor_uses`): the forward's statements are walked once per plan,
    not once per gradient and answer, and the answers are those of a fresh walk."""
    from app.programs import slips

    plan = programs_run.admit(ProgramRequest.model_validate(MAKEMORE), 1 << 30, 2.5)
    walked = []
    real_writes = slips._writes
    monkeypatch.setattr(slips, "_writes", lambda stmt: walked.append(stmt) or real_writes(stmt))
    names = list(plan.has_grad)
    uses = {name: slips.tensor_uses(plan, name) for name in names}
    assert len(walked) == len(plan.forward.body)
    assert {name: slips.tensor_uses(plan, name) for name in names} == uses
    assert len(walked) == len(plan.forward.body)  # asked again: not walked again
    fresh = programs_run.admit(ProgramRequest.model_validate(MAKEMORE), 1 << 30, 2.5)
    assert fresh is not plan and {name: slips.tensor_uses(fresh, name) for name in names} == uses
    assert len(uses["bndiff"]) == 2  # bndiff2 = bndiff**2 and bnraw = bndiff * bnvar_inv
