"""Request and response models of POST /api/program: the learner's own network, written as a
forward and a backward in lines. Limits live here, so they show in /openapi.json."""

from __future__ import annotations

import keyword
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from app.lab.allowlist import is_number
from app.lab.parse_program import MAX_PROGRAM_CHARS
from app.schemas import MAX_CELLS, MAX_SEED, DType, GradientView
from app.schemas.response import Diagnosis

MAX_INPUTS = 64
MAX_INPUT_DIMS = 6
MAX_INPUT_ELEMENTS = 1 << 24  # per made input; the memory budget bounds them together
MAX_VALUE_ENTRIES = 65_536  # numbers written out in one `value`
MAX_SCALE = 1e6
MAX_HIGH = 1 << 20
MAX_BLOCK = 16
MAX_ROWS = 1 << 20
PROGRAM_BODY_BYTES = 1 << 20  # this route's body limit: value inputs take room
RESERVED_NAMES = frozenset({"torch", "F", "range", "True", "False", "None"})

Init = Literal["randn", "zeros", "ones", "randint"]


class InputSpec(BaseModel):
    """One name the forward reads: made from the seed (`shape` + `init`), given (`value`), or
    read from data (`data`)."""

    model_config = ConfigDict(extra="forbid")

    shape: list[Annotated[int, Field(strict=True, ge=1, le=MAX_INPUT_ELEMENTS)]] | None = Field(
        None, max_length=MAX_INPUT_DIMS, description="The tensor's shape (with `init`)"
    )
    init: Init | None = Field(
        None,
        description="randn (torch.randn * scale + offset), zeros, ones (times scale plus "
        "offset), randint (torch.randint(high, shape): an int64 tensor); default randn",
    )
    scale: Annotated[float, Field(strict=False, ge=-MAX_SCALE, le=MAX_SCALE)] = 1.0
    offset: Annotated[float, Field(strict=False, ge=-MAX_SCALE, le=MAX_SCALE)] = 0.0
    high: Annotated[int, Field(strict=True, ge=1, le=MAX_HIGH)] | None = Field(
        None, description="randint: values in 0..high-1"
    )
    grad: StrictBool | None = Field(
        None,
        description="Whether the tensor gets a gradient (checked against autograd); default: "
        "true for a float tensor, false for an integer one",
    )
    value: Any = Field(
        None,
        description="The numbers themselves: a nested list (integers make an int64 tensor) "
        f"of at most {MAX_VALUE_ENTRIES} entries, or one number (a plain Python number, "
        "such as a batch size n)",
    )
    data: Literal["names", "mnist", "digits"] | None = Field(
        None,
        description="names: character contexts (X, (rows, block_size)), next characters (Y, "
        "(rows,)) or the character after every position (Yseq, (rows, block_size)) from the "
        "US Census first-name lists of the `names` package: lower-cased, '.' as start/end, 27 "
        "symbols. mnist / digits: images (X, (rows, 1, 28, 28) / (rows, 1, 8, 8) in [0, 1]) "
        "and labels (Y, (rows,) int64) of the training part, shuffled with the seed",
    )
    field: Literal["X", "Y", "Yseq"] | None = None
    block_size: Annotated[int, Field(strict=True, ge=1, le=MAX_BLOCK)] = 3
    rows: Annotated[int, Field(strict=True, ge=1, le=MAX_ROWS)] = 32

    @model_validator(mode="after")
    def _one_source(self) -> InputSpec:
        sources = [self.shape is not None, self.value is not None, self.data is not None]
        if sum(sources) != 1:
            raise ValueError("give exactly one of: shape (with init), value, or data (with field)")
        if self.data is not None and self.field is None:
            raise ValueError('data input needs field: "X" (contexts) or "Y" (next characters)')
        if self.data in ("mnist", "digits") and self.field == "Yseq":
            raise ValueError(f'{self.data} has field "X" (images) or "Y" (labels); Yseq is '
                             "the names' targets at every position")  # fmt: skip
        if self.shape is not None:
            if math.prod(self.shape) > MAX_INPUT_ELEMENTS:
                raise ValueError(
                    f"shape {self.shape} has {math.prod(self.shape):,} entries; at most "
                    f"{MAX_INPUT_ELEMENTS:,}"
                )
            if (self.init == "randint") != (self.high is not None):
                raise ValueError('high goes with init "randint", and randint needs high')
        if self.value is not None:
            _check_value(self.value)
        return self

    @property
    def integer(self) -> bool:
        if self.data is not None:
            return self.data == "names" or self.field == "Y"
        if self.init == "randint":
            return True
        if self.value is not None:
            return _all_ints(self.value)
        return False

    @property
    def wants_grad(self) -> bool:
        if self.integer or (self.value is not None and not isinstance(self.value, list)):
            return False
        return True if self.grad is None else self.grad


def _check_value(value: Any) -> None:
    """A number, or a rectangular nested list of numbers, of bounded size."""
    if is_number(value):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("a value is a finite number")
        return
    if not isinstance(value, list):
        raise ValueError("value is a number or a nested list of numbers")
    count, stack = 0, [(value, 0)]
    widths: dict[int, int] = {}
    while stack:
        item, depth = stack.pop()
        if depth > MAX_INPUT_DIMS:
            raise ValueError(f"value nests over {MAX_INPUT_DIMS} levels")
        if isinstance(item, list):
            if widths.setdefault(depth, len(item)) != len(item):
                raise ValueError("value is not rectangular: rows of different lengths")
            stack.extend((x, depth + 1) for x in item)
            continue
        if not is_number(item) or (isinstance(item, float) and not math.isfinite(item)):
            raise ValueError("value holds finite numbers only")
        count += 1
        if count > MAX_VALUE_ENTRIES:
            raise ValueError(f"value has over {MAX_VALUE_ENTRIES} entries")


def _all_ints(value: Any) -> bool:
    if isinstance(value, list):
        return all(_all_ints(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool)


Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9_]*$")]


class ProgramFollow(BaseModel):
    """One element of a written gradient to follow back to the terms that made it."""

    model_config = ConfigDict(extra="forbid")

    grad: Annotated[str, Field(min_length=1, max_length=66)] = Field(
        description="The gradient as the backward writes it (dWq, Wq.g) or its tensor (Wq)"
    )
    index: list[Annotated[int, Field(strict=True, ge=0)]] = Field(
        max_length=MAX_INPUT_DIMS + 2, description="The element's index in that gradient"
    )


class ProgramRequest(BaseModel):
    """A network written as lines: the inputs it reads, its forward (ending with the scalar
    loss) and the learner's backward. Every gradient the backward writes (`d<name>` or
    `<name>.g`) is checked against autograd's gradient of the same tensor."""

    model_config = ConfigDict(extra="forbid")

    inputs: dict[Name, InputSpec] = Field(
        default_factory=dict,
        max_length=MAX_INPUTS,
        description="Every name the forward reads that it does not assign, made in this order "
        "from one torch.Generator().manual_seed(seed)",
    )
    forward: str = Field(
        max_length=MAX_PROGRAM_CHARS,
        description="Lines `name = expression`, ending with the scalar loss",
    )
    backward: str = Field(
        "",
        max_length=MAX_PROGRAM_CHARS,
        description="Lines `name = expr`, `name op= expr`, `name[index] = expr`, "
        "`name[index] op= expr`, and `for i in range(...):` blocks. Assigning `d<name>` or "
        "`<name>.g` writes that tensor's gradient; other names are helpers.",
    )
    loss: Name = Field("loss", description="The forward's name for the scalar loss")
    seed: Annotated[int, Field(strict=True, ge=0, le=MAX_SEED)] = 0
    dtype: DType = "float32"
    max_cells: Annotated[int, Field(strict=True, ge=1, le=MAX_CELLS)] = Field(
        4096, description="Each gradient heatmap is block-downsampled to at most this many cells"
    )
    reference_heatmaps: StrictBool = Field(
        False,
        description="Also send, for every gradient the backward wrote in autograd's shape, "
        "autograd's heatmap on the same blocks (`reference_heatmap`) and the difference in "
        "units of the check's tolerance (`tolerance_heatmap`: each block's largest "
        "|manual - autograd| / (atol + rtol |autograd|); at most 1 passes), as /api/run's "
        "`reference_heatmaps`. The page asks for them; `heatmap` is always sent.",
    )
    follow: ProgramFollow | None = Field(
        None,
        description="Answer `follow`: the line that last wrote this element of a gradient and "
        "the terms of its last reduction (at most 4096 listed; terms_total and sum cover all)",
    )

    @field_validator("inputs")
    @classmethod
    def _names(cls, inputs: dict[str, InputSpec]) -> dict[str, InputSpec]:
        for name in inputs:
            if keyword.iskeyword(name) or name in RESERVED_NAMES:
                raise ValueError(f"{name!r} is a reserved word; name the input otherwise")
        return inputs


class ProgramTensor(BaseModel):
    shape: list[int]
    dtype: str
    role: Literal["input", "param", "intermediate", "loss", "gradient", "helper"]
    bytes: int


class ProgramLine(BaseModel):
    model_config = ConfigDict(extra="allow")

    line: int = Field(description="1-based, in its own text")
    code: str
    target: str = Field(description="The name the line assigns or writes")
    steps: list[dict[str, Any]]
    runs: int = Field(1, description="How often the line ran (a loop's body: every iteration)")
    grad_of: str | None = Field(
        None, description="Backward only: the tensor whose gradient the line writes"
    )
    reads: list[str] | None = Field(
        None, description="Forward only: the inputs and forward names the line reads"
    )


class ProgramCheck(BaseModel):
    model_config = ConfigDict(extra="allow")

    written: bool
    shape_ok: bool
    exact: bool
    allclose: bool
    suspect: bool = False
    max_abs_err: float | None
    max_rel_err: float | None
    rtol: float | None
    atol: float | None
    lines: list[int] = Field(default_factory=list, description="The lines that wrote it")
    hint: str | None = None
    diagnosis: Diagnosis | None = Field(
        None, description="null when all-close (or unwritten); else why the gradient is wrong"
    )


class BackwardError(BaseModel):
    model_config = ConfigDict(extra="allow")

    line: int
    code: str
    message: str
    hint: str | None


class ProgramResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    loss: float | None
    tensors: dict[str, ProgramTensor]
    forward: list[ProgramLine]
    backward: list[ProgramLine]
    check: dict[str, Any] = Field(
        description='{"all_close", "suspects", "first_failure", "tensors": {name: ProgramCheck}}'
    )
    gradients: dict[str, GradientView | dict[str, Any]]
    backward_error: BackwardError | None
    timing: dict[str, float]


class ProgramTrainRequest(BaseModel):
    """SGD over a program's inputs that have a gradient, with the gradients its own backward
    writes (POST /api/program/train)."""

    model_config = ConfigDict(extra="forbid")

    program: ProgramRequest
    steps: Annotated[int, Field(strict=True, ge=1, le=20_000)] = Field(
        1000, description="SGD steps, at most 20,000"
    )
    batch: Annotated[int, Field(strict=True, ge=1, le=MAX_ROWS)] = Field(
        32,
        description="A names program's minibatch: its data inputs' rows, and a plain-number "
        "input equal to those rows (its `n`). Any other program trains on its inputs whole",
    )
    lr: Annotated[float, Field(gt=0, le=100)] = Field(0.1, description="Learning rate")
    seed: Annotated[int, Field(strict=True, ge=0, le=MAX_SEED)] = Field(
        0,
        description="The minibatches' and the samples' seed (the weights come from the "
        "program's own seed)",
    )
    eval_every: Annotated[int, Field(strict=True, ge=1, le=20_000)] | None = Field(
        None,
        description="Steps between val losses and samples (default: steps // 10, at least 5, at most 100)",
    )
    report_every: Annotated[int, Field(strict=True, ge=1, le=20_000)] | None = Field(
        None,
        description="Steps between `step` events (default: steps // 500, at least 1); "
        "an event's `loss` is the mean over its steps",
    )
