"""POST /api/export: a run to take home as a file."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from app.schemas.run import RunRequest


class ExportRequest(BaseModel):
    """A run to take home as a file that needs only torch (POST /api/export)."""

    model_config = ConfigDict(extra="forbid")

    config: RunRequest = Field(
        default_factory=RunRequest,
        description="The run, as POST /api/run takes it (default: the article's)",
    )
    program: dict[str, Any] | None = Field(
        None,
        description="Instead of config: a POST /api/program body. The file rebuilds its "
        "inputs, runs its forward under autograd and its backward by hand, and checks every "
        "gradient the backward writes (exit 0 when all match)",
    )
    format: Literal["py", "ipynb"] = Field(
        "py",
        description="py: a script that exits 0 exactly when every gradient matches autograd; "
        "ipynb: a Jupyter notebook (nbformat v4, no outputs) with the same code in cells",
    )
    hide: Annotated[list[str], Field(max_length=64)] = Field(
        default_factory=list,
        description='Gradients ("x.g") whose built-in formulas the file must not show, as in an '
        "exercise: each must have the learner's formula in config.formulas, which the file "
        "shows alone; other built-in formulas for it (e.g. cross-entropy's fused out.g) are "
        "left out.",
    )

    @field_validator("hide")
    @classmethod
    def _hidden_need_formulas(cls, hide: list[str], info: ValidationInfo) -> list[str]:
        config = info.data.get("config")
        missing = [key for key in hide if config is not None and key not in config.formulas]
        if missing:
            raise ValueError(
                f"{', '.join(missing)} would need Broadprop's own formula in the file; "
                "write it in config.formulas first"
            )
        return hide
