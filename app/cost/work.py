"""How long a run will hold its slot, estimated from shapes alone before it starts.

A run makes several passes over its network, and every one of them counts:
- the forward pass, and the manual backward under its strategy (the literal broadcast form
  materializes N * in * out products per linear layer, chunk by chunk);
- the autograd check (a forward and a backward of its own);
- the rounding recheck, for runs small enough to get it (the manual formulas and autograd
  again, in the other precision; only a failing check runs it, but the bound must hold);
- with fd_samples: the float64 rerun of the manual formulas (for a float32 run) and the
  finite differences themselves (many small float64 passes);
- with compare: every strategy's backward and autograd's, each run two to four times, the
  first under a memory-measuring dispatch mode that is slower than a plain pass;
- the views (heatmaps, stats) over every gradient;
- drawing the tensors themselves (randn for x and every weight: 30 M numbers for two
  4096 x 4096 layers and a 4096 x 3000 one);
- the learner's own formulas: their elements read or written (`formula_elements`) and
  their matmuls' and einsums' flops (`formula_flops`), at the rates above.

The constants were measured on the development machine (2 shared cores; see
benchmarks/calibrate.py, which prints the model against measured runs) and err on the slow
side. The model decides what is refused before the run (422 naming the field to change); the
run's deadline (BROADPROP_RUN_DEADLINE_S, app/server/lanes.py) stops whatever it misjudges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.check.fd import fd_cost_flops
from app.cost.plan import RunPlan, plan
from app.engine.network import Network
from app.engine.tensors import input_specs, layer_sizes, lead_shape
from app.ops.linear import chunk_rows

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
COMPARE_SLOW_S = 0.25  # compare times one run above this (app/runs/compare.py), else up to three
# compare's first pass of each strategy runs under PeakMemory (app/engine/memory.py), a dispatch
# mode that sees every op and every live storage. A broadcast layer whose chunk does not stay
# in cache (wide rows) takes this many plain passes' time under it (4096 -> 4096 -> 3000 at
# batch 2: 2.5 s where a plain pass took 1.0 s, one thread); cached chunks about one
MEASURED_PASS_FACTOR = 2.5
DRAW_S = 10e-9  # per random number drawn for the run's tensors (torch.randn on one thread)

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
    draw: float = 0.0  # drawing the tensors (x, the weights: randn) before any pass


def _plan(run) -> RunPlan:
    return run if isinstance(run, RunPlan) else plan(run)


def formula_elements(run) -> int:
    """Elements the learner's own formulas read or write in one backward pass: the `work` of
    their meta-traced entries; 0 without formulas. `run`: a RunPlan, or a config."""
    return sum(entry.get("work", 0) for entry in _plan(run).user)


def formula_flops(run) -> int:
    """Flops of the learner's matmuls and einsums in one backward pass: they run at the BLAS
    rate, as the built-in matmul and einsum strategies do."""
    return sum(entry.get("flops", 0) for entry in _plan(run).user)


def builtin_share(cfg) -> float:
    """The share of the backward pass that runs twice with the learner's formulas: the ops
    from the last one whose output gradient a formula replaces back to the first (a formula
    for a leaf's gradient, w1.g say, changes nothing upstream). Counted by ops, in forward
    order, the linear layers' share being about even."""
    names = {key.removesuffix(".g") for key in getattr(cfg, "formulas", None) or {}}
    if not names:
        return 0.0
    ops = Network.from_config(cfg).ops
    replaced = [i for i, op in enumerate(ops) if op.output in names]
    return (max(replaced) + 1) / len(ops) if replaced else 0.0


def _matmul_s(flops: float, itemsize: int) -> float:
    return flops / MATMUL_FLOPS * itemsize / 4


def _elementwise_s(nbytes: float) -> float:
    return nbytes / ELEMENTWISE_BYTES


def streamed(n: int, fan_in: int, fan_out: int, itemsize: int, chunk_bytes: int) -> bool:
    """Whether one broadcast chunk of this layer is bigger than the cache."""
    rows = min(n, chunk_rows(fan_in, fan_out, itemsize, chunk_bytes))
    return rows * fan_in * fan_out * itemsize > CACHE_BYTES


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
    # every w.g written whole, however few the rows (a 4096 x 4096 outer product at batch 2
    # is 67 MB of writes and next to no flops); autograd accumulates it into .grad as well
    weight_grads = _elementwise_s(sum(i * o for i, o in sizes) * itemsize)
    matmul_backward = _matmul_s(2 * flops, itemsize) + 2 * elementwise + weight_grads
    layers = [broadcast_layer_s(n, i, o, itemsize, chunk_bytes) for i, o in sizes]
    broadcast = sum(layers)
    measured = sum(
        s * (MEASURED_PASS_FACTOR if streamed(n, i, o, itemsize, chunk_bytes) else 1)
        for s, (i, o) in zip(layers, sizes)
    )
    return {
        "forward": forward,
        "broadcast": broadcast + 2 * elementwise,
        "einsum": matmul_backward,
        "matmul": matmul_backward,
        "autograd": forward + matmul_backward + weight_grads,
        "broadcast_measured": measured + 2 * elementwise,  # under compare's PeakMemory
    }


def estimate(run, chunk_bytes: int) -> Work:
    """Seconds a run holds its slot, every pass its plan makes counted (see the module's doc).
    `run`: a RunPlan (app/cost/plan.py), or a config (planned here)."""
    run = _plan(run)
    cfg, itemsize = run.cfg, run.itemsize
    other = run.other_itemsize  # the recheck's and the fd rerun's precision
    here = _passes(cfg, itemsize, chunk_bytes)
    there = _passes(cfg, other, chunk_bytes)
    specs = input_specs(cfg)
    # what the comparison and the views walk: the float tensors and the layers' outputs
    gradients = sum(math.prod(s.shape) * itemsize for s in specs if not s.integer) + sum(
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
    recheck = manual_other + there["autograd"] if run.recheck else 0.0
    fd = 0.0
    if cfg.fd_samples:
        widths = [cfg.in_features, *cfg.hidden, cfg.out_features]
        samples = sum(min(cfg.fd_samples, math.prod(s.shape)) for s in specs if not s.integer)
        fd_ops = samples * 4 * len(widths) * 8  # per sample: 4 passes of a few ops per layer
        fd = fd_cost_flops(cfg) / FD_FLOPS + fd_ops * OP_S
        if run.fd_rerun and not run.recheck:  # the float64 rerun (shared with the recheck)
            fd += manual_other
    compare = 0.0
    if cfg.compare:
        for name in ("broadcast", "einsum", "matmul", "autograd"):
            once = here[name]
            # the measured pass, then one timed pass (a slow one) or up to three
            compare += here.get(f"{name}_measured", once) + once * (
                1 if once > COMPARE_SLOW_S else 3
            )
    # the learner's formulas run as written (no chunks), in every manual backward but
    # compare's: the run's, and the rerun in the other precision (recheck or fd's float64),
    # costed in float64 (the slower of the two, whichever the run's is)
    elements, flops = formula_elements(run), formula_flops(run)

    def formulas_s(size: int) -> float:
        return _elementwise_s(elements * size) + _matmul_s(flops, size)

    formulas = formulas_s(itemsize) + (formulas_s(8) if run.rerun else 0.0)
    # the built-in formulas again upstream of a learner's formula for an intermediate: the
    # suspect verdict's measure of rounding (app/check/autograd.py mark_suspects)
    formulas += backward * builtin_share(cfg)
    # every tensor drawn from the generator (weights, biases, x, target), then cast
    draw = sum(math.prod(s.shape) for s in specs) * DRAW_S * (1 + (itemsize == 8))
    total = forward + backward + check + recheck + fd + compare + formulas + draw
    return Work(total, forward, backward, check, recheck, fd, compare, formulas, draw)


# The learner's formulas' dry run (the evaluator, Traced ops on meta tensors): pure Python,
# 6-10 us per character of formula measured warm (the largest body, 59 KB: 0.4-0.6 s); a
# cold process pays about 3x once.
DRY_RUN_S_PER_CHAR = 15e-6
# A dry run estimated at most this long runs where the check runs (any thread); a longer one
# takes the dry-run lane's slot (app/server/lanes.py), one at a time
DRY_RUN_INLINE_S = 0.05


def dry_run_s(cfg) -> float:
    """Seconds the dry run of `cfg`'s formulas may take, from their length alone (before
    anything is parsed); 0 without formulas."""
    sources = getattr(cfg, "formulas", None) or {}
    return DRY_RUN_S_PER_CHAR * sum(len(key) + len(source) for key, source in sources.items())


def interpret_s(cfg) -> float:
    """Seconds of Python the run itself spends in the learner's formulas, whatever the size of
    their tensors: the evaluator walks them again on the real tensors, about as long as their
    dry run (the largest body, 42 formulas on a batch of 2: 0.34 s dry run, 0.5 s run, where
    `estimate` counts 0.07 s of tensor work). Not part of the work limit; it weighs a run for
    the lanes (app/server/lanes.py), so that a run of long formulas, heavy for the GIL however
    small its config, never takes a light run's slot."""
    return dry_run_s(cfg)
