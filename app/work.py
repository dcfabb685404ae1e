"""How long a run will hold its slot, estimated from shapes alone before it starts.

A run makes several passes over its network, and every one of them counts:
- the forward pass, and the manual backward under its strategy (the literal broadcast form
  materializes N * in * out products per linear layer, chunk by chunk);
- the autograd check (a forward and a backward of its own);
- the rounding recheck, for runs small enough to get it (the manual formulas and autograd
  again, in the other precision; only a failing check runs it, but the bound must hold);
- with fd_samples: the float64 rerun of the manual formulas (for a float32 run) and the
  finite differences themselves (many small float64 passes);
- with compare: every strategy's backward and autograd's, each run two to four times;
- the views (heatmaps, stats) over every gradient;
- the learner's own formulas: their elements read or written (`formula_elements`) and
  their matmuls' and einsums' flops (`formula_flops`), at the rates above.

The constants were measured on the development machine (2 shared cores; see
benchmarks/calibrate.py, which prints the model against measured runs) and err on the slow
side. The model decides what is refused before the run (422 naming the field to change); the
run's deadline (BROADPROP_RUN_DEADLINE_S, app/server/limits.py) stops whatever it misjudges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.check import RECHECK_MAX_BYTES
from app.fd import fd_cost_flops
from app.ops.linear import chunk_rows
from app.tensors import input_specs, layer_sizes, lead_shape

# float32 rates; float64 takes twice as long per element (and half the flops per second)
MATMUL_FLOPS = 25e9  # flops/s of the runs' matmuls on 2 threads (~50 at best, less for few rows)
ELEMENTWISE_BYTES = 2e9  # bytes/s written by elementwise ops and reductions
CACHED_PRODUCT_S = 0.4e-9  # per element of a broadcast product whose chunk stays in cache
STREAMED_PRODUCT_S = 4.5e-9  # per element when one chunk is bigger than the cache (wide rows)
CACHE_BYTES = 6 << 20  # a chunk up to this stays in cache (4 MiB chunks do, 8 MiB do not)
ROW_S = 5e-9  # per row entry (N * (in + out)) of a broadcast layer: unsqueeze, mask, copies
ACCUMULATE_S = 1e-9  # per w.g entry per chunk: the float64 sum of the chunks' shares
OP_S = 20e-6  # per torch call from Python (dispatch, small tensors)
FD_FLOPS = 2e9  # flops/s of the finite differences' small float64 passes
COMPARE_SLOW_S = 0.25  # compare times one run above this (app/compare.py), else up to three

# What an accepted run may be estimated to take. The deadline (3 s by default) is the hard
# bound; the model errs on the slow side by about 1.5-2x for most runs.
WORK_LIMIT_S = 2.5


@dataclass(frozen=True)
class Work:
    """Estimated seconds, by what they are spent on."""

    total: float
    forward: float
    backward: float  # the manual backward under the run's strategy
    check: float  # autograd, the comparison, the views
    recheck: float
    finite_difference: float
    compare: float
    formulas: float


def _user_entries(cfg) -> list[dict]:
    """The meta-traced entries of the learner's formulas (app/lab); none without formulas."""
    if not getattr(cfg, "formulas", None):
        return []
    from app import pipeline  # the traces are cached there (and it imports this module's users)

    _, backward = pipeline.trace(cfg)
    return [entry for entry in backward if entry.get("source") == "user"]


def formula_elements(cfg) -> int:
    """Elements the learner's own formulas read or write in one backward pass: the `work` of
    their meta-traced entries; 0 without formulas."""
    return sum(entry.get("work", 0) for entry in _user_entries(cfg))


def formula_flops(cfg) -> int:
    """Flops of the learner's matmuls and einsums in one backward pass: they run at the BLAS
    rate, as the built-in matmul and einsum strategies do."""
    return sum(entry.get("flops", 0) for entry in _user_entries(cfg))


def _matmul_s(flops: float, itemsize: int) -> float:
    return flops / MATMUL_FLOPS * itemsize / 4


def _elementwise_s(nbytes: float) -> float:
    return nbytes / ELEMENTWISE_BYTES


def broadcast_layer_s(n: int, fan_in: int, fan_out: int, itemsize: int, chunk_bytes: int) -> float:
    """The literal broadcast backward of one linear layer: x.g's and w.g's products over every
    chunk, the per-row work, and the float64 accumulation of each chunk's share of w.g."""
    rows = min(n, chunk_rows(fan_in, fan_out, itemsize, chunk_bytes))
    chunks = math.ceil(n / rows)
    streamed = rows * fan_in * fan_out * itemsize > CACHE_BYTES
    per_product = STREAMED_PRODUCT_S if streamed else CACHED_PRODUCT_S
    scale = itemsize / 4
    return (
        2 * n * fan_in * fan_out * per_product * scale
        + n * (fan_in + fan_out) * ROW_S * scale
        + chunks * (fan_in * fan_out * ACCUMULATE_S + 8 * OP_S)
    )


def _passes(cfg, itemsize: int, chunk_bytes: int) -> dict[str, float]:
    """Seconds of one forward, each backward strategy, and autograd, in `itemsize`."""
    n = math.prod(lead_shape(cfg.batch))
    sizes = layer_sizes(cfg.in_features, cfg.hidden, cfg.out_features)
    flops = sum(2 * n * i * o for i, o in sizes)
    activations = sum(n * o for _, o in sizes) * itemsize
    norm_factor = 1 if cfg.norm == "none" else 4  # a norm's mean, var, xhat, scale and shift
    ops = 8 * len(sizes) * norm_factor
    elementwise = _elementwise_s(4 * activations * norm_factor) + ops * OP_S
    forward = _matmul_s(flops, itemsize) + elementwise
    matmul_backward = _matmul_s(2 * flops, itemsize) + 2 * elementwise
    broadcast = sum(broadcast_layer_s(n, i, o, itemsize, chunk_bytes) for i, o in sizes)
    return {
        "forward": forward,
        "broadcast": broadcast + 2 * elementwise,
        "einsum": matmul_backward,
        "matmul": matmul_backward,
        "autograd": forward + matmul_backward,
    }


def estimate(cfg, chunk_bytes: int) -> Work:
    """Seconds a run of `cfg` holds its slot, every pass counted (see the module's doc)."""
    itemsize = 8 if cfg.dtype == "float64" else 4
    other = 12 - itemsize  # the recheck's and the fd rerun's precision
    here = _passes(cfg, itemsize, chunk_bytes)
    there = _passes(cfg, other, chunk_bytes)
    specs = input_specs(cfg)
    float_bytes = sum(math.prod(s.shape) * itemsize for s in specs if not s.integer)
    gradients = float_bytes + sum(
        math.prod(lead_shape(cfg.batch)) * o * itemsize
        for _, o in layer_sizes(cfg.in_features, cfg.hidden, cfg.out_features)
    )

    forward = here["forward"]
    backward = here[cfg.strategy]
    # autograd, then the comparison and the views over every gradient: a few passes each, some
    # 20 more with reference_heatmaps (autograd's map, the difference's, the tolerance's)
    passes = 8 + (24 if cfg.reference_heatmaps else 0)
    check = here["autograd"] + _elementwise_s(passes * gradients) + len(specs) * 20 * OP_S
    manual_other = there["forward"] + there[cfg.strategy]
    small = float_bytes + gradients <= RECHECK_MAX_BYTES
    recheck = manual_other + there["autograd"] if small else 0.0
    fd = 0.0
    if cfg.fd_samples:
        widths = [cfg.in_features, *cfg.hidden, cfg.out_features]
        samples = sum(min(cfg.fd_samples, math.prod(s.shape)) for s in specs if not s.integer)
        fd_ops = samples * 4 * len(widths) * 8  # per sample: 4 passes of a few ops per layer
        fd = fd_cost_flops(cfg) / FD_FLOPS + fd_ops * OP_S
        if itemsize == 4 and not small:  # the float64 rerun (shared with the recheck if any)
            fd += manual_other
    compare = 0.0
    if cfg.compare:
        for name in ("broadcast", "einsum", "matmul", "autograd"):
            once = here[name]
            compare += once * (2 if once > COMPARE_SLOW_S else 4)
    # the learner's formulas run as written (no chunks), in every manual backward but
    # compare's: the run's, and the rerun in the other precision (recheck or fd's float64),
    # costed in float64 (the slower of the two, whichever the run's is)
    elements, flops = formula_elements(cfg), formula_flops(cfg)

    def formulas_s(size: int) -> float:
        return _elementwise_s(elements * size) + _matmul_s(flops, size)

    rerun = small or (cfg.fd_samples > 0 and itemsize == 4)
    formulas = formulas_s(itemsize) + (formulas_s(8) if rerun else 0.0)
    total = forward + backward + check + recheck + fd + compare + formulas
    return Work(total, forward, backward, check, recheck, fd, compare, formulas)
