"""POST /api/run's response: the trace, the checks, the views of every tensor."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
)

from app.schemas.run import MAX_FOLLOW_TERMS, RunRequest, Shape


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


class Diagnosis(BaseModel):
    """Why a failing gradient is wrong (app/check/diagnosis.py), tested against autograd."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    kind: Literal["upstream", "scale", "sign", "transpose", "shape", "missing_branch",
                  "dropped_duplicates", "precision", "unknown"]  # fmt: skip
    message: str = Field(description="The slip in the learner's words")
    factor: float | None = Field(None, description="scale: G / R, the same everywhere")
    factor_words: str | None = Field(None, description='scale: "1/n", "n/(n-1)", "2", ...')
    from_: str | None = Field(None, alias="from", description="upstream: the wrong gradient "
                              "the line reads (a tensor's name)")  # fmt: skip
    root: str | None = Field(None, description="upstream: the first wrong gradient on its path")
    missing: list[str] | None = Field(None, description="missing_branch: the forward lines "
                                      "(by the names they assign) whose part is missing")  # fmt: skip


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
    diagnosis: Diagnosis | None = Field(
        None, description="null when all-close; else why the gradient is wrong"
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
    formula_value: float | None = Field(
        None, description='With source "user": what the built-in formula\'s terms add up to'
    )
    agrees: bool | None = Field(
        None, description='With source "user": whether the learner\'s value is the built-in one'
    )
    note: str | None = Field(
        None,
        description="Where they differ: the learner's value against the terms' sum, in words",
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
