"""Tensors -> what the page draws: exact stats and a block-averaged heatmap.

Downsampling lives here only. A heatmap shows a 1-D tensor as one row, a 2-D tensor as it
is, and more dims as (product of leading dims, last dim).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def as_2d(t: torch.Tensor) -> torch.Tensor:
    if t.ndim == 0:
        return t.reshape(1, 1)
    if t.ndim == 1:
        return t.reshape(1, -1)
    return t.reshape(-1, t.shape[-1])


def block_sizes(rows: int, cols: int, max_cells: int) -> tuple[int, int]:
    """(row_block, col_block) such that ceil(rows/rb) * ceil(cols/cb) <= max_cells.

    Blocks start square (so the picture keeps its aspect) and grow along rows until the
    columns fit; (1, 1) when the tensor fits as it is.
    """
    if rows * cols <= max_cells:
        return 1, 1
    row_block = min(rows, max(1, math.floor(math.sqrt(rows * cols / max_cells))))
    while True:
        n_rows = math.ceil(rows / row_block)
        cols_allowed = max_cells // n_rows
        if cols_allowed >= 1:
            col_block = math.ceil(cols / cols_allowed)
            if n_rows * math.ceil(cols / col_block) <= max_cells:
                return row_block, col_block
        row_block += 1


def block_mean(t2: torch.Tensor, row_block: int, col_block: int) -> torch.Tensor:
    """Mean over each (row_block, col_block) block; edge blocks average what they hold.

    avg_pool2d with ceil_mode leaves the part of an edge window past the tensor out of its
    divisor, which is exactly that. A block holding a non-finite value is non-finite (null).
    """
    if row_block == col_block == 1:
        return t2
    pooled = torch.nn.functional.avg_pool2d(
        t2[None, None], (row_block, col_block), stride=(row_block, col_block), ceil_mode=True
    )
    return pooled[0, 0]  # (ceil(rows / row_block), ceil(cols / col_block))


def stats(
    t: torch.Tensor, min_max: tuple[torch.Tensor, torch.Tensor] | None = None
) -> dict[str, float]:
    """Exact over the whole tensor; sums accumulate in float64 so the mean and norm do not
    round, without a float64 copy of the whole tensor (`sum_and_norm`). `min_max`: the
    blocks' own minima and maxima (`block_min_max`), when a heatmap made them: the tensor's
    are theirs, without two more passes over it. A tensor with no entries (a program's `x[range(0)]`) has none to
    describe: all four are 0."""
    if t.numel() == 0:
        return {"min": 0.0, "max": 0.0, "mean": 0.0, "norm": 0.0}
    low, high = min_max if min_max is not None else (t, t)
    total, norm = sum_and_norm(t)
    return {
        "min": low.min().item(),
        "max": high.max().item(),
        "mean": total / t.numel(),
        "norm": norm,
    }


# float64 copies of this many entries at a time (512 KiB): `sum(dtype=torch.float64)` and
# `vector_norm(dtype=torch.float64)` each cast the whole tensor first (x.g's: 6.3 MB, twice)
STATS_PASS_ENTRIES = 1 << 16


def sum_and_norm(t: torch.Tensor) -> tuple[float, float]:
    """The sum of `t`'s entries and their 2-norm, accumulated in float64, in passes of
    STATS_PASS_ENTRIES. (A float32 entry's square never overflows float64.)"""
    if t.dtype == torch.float64:  # nothing to cast
        return t.sum().item(), torch.linalg.vector_norm(t).item()
    total = squares = 0.0
    for part in t.reshape(-1).split(STATS_PASS_ENTRIES):
        wide = part.double()  # (<= STATS_PASS_ENTRIES,)
        total += wide.sum().item()
        squares += torch.dot(wide, wide).item()
    return total, math.sqrt(squares)


def count_nonfinite(t: torch.Tensor, st: dict[str, float]) -> int:
    """NaN and +-inf entries. min and max already tell whether there are any (NaN spreads
    through both); only then count, as isfinite() takes several copies' worth of memory."""
    if math.isfinite(st["min"]) and math.isfinite(st["max"]):
        return 0
    return int((~torch.isfinite(t)).sum().item())


def block_min_max(
    t2: torch.Tensor, row_block: int, col_block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's smallest and largest entry (NaN wins: a non-finite entry is never
    hidden), edge blocks over what they hold: max_pool2d's answer, exactly, at a quarter of
    its time. The rows of a block are folded first (an elementwise min and max of `row_block`
    whole rows, vectorized along them), then the columns of what is left, 1/row_block of it."""
    rows, cols = t2.shape
    n_rows, n_cols = -(-rows // row_block), -(-cols // col_block)
    whole_rows, whole_cols = rows // row_block, cols // col_block
    low, high = t2.new_empty(n_rows, cols), t2.new_empty(n_rows, cols)  # rows folded
    if whole_rows:
        bulk = t2[: whole_rows * row_block].reshape(whole_rows, row_block, cols)
        torch.amin(bulk, 1, out=low[:whole_rows])
        torch.amax(bulk, 1, out=high[:whole_rows])
    if whole_rows < n_rows:  # the last, shorter block of rows
        torch.amin(t2[whole_rows * row_block :], 0, keepdim=True, out=low[whole_rows:])
        torch.amax(t2[whole_rows * row_block :], 0, keepdim=True, out=high[whole_rows:])
    folded = []
    for part, reduce in ((low, torch.amin), (high, torch.amax)):
        out = part.new_empty(n_rows, n_cols)
        if whole_cols:
            split = part[:, : whole_cols * col_block].reshape(n_rows, whole_cols, col_block)
            reduce(split, -1, out=out[:, :whole_cols])
        if whole_cols < n_cols:  # the last, narrower block of columns
            reduce(part[:, whole_cols * col_block :], -1, keepdim=True, out=out[:, whole_cols:])
        folded.append(out)
    return folded[0], folded[1]


def block_extreme(t2: torch.Tensor, row_block: int, col_block: int) -> torch.Tensor:
    """Each block's entry of largest magnitude, sign kept: a difference map where no error
    can average away against another."""
    if row_block == col_block == 1:
        return t2
    return extreme_of(*block_min_max(t2, row_block, col_block))


def extreme_of(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Of each block's smallest and largest entry, the one of larger magnitude."""
    return torch.where(low.abs() > high.abs(), low, high)


def block_max(t2: torch.Tensor, row_block: int, col_block: int) -> torch.Tensor:
    """Each block's largest entry (NaN wins: a non-finite entry is never hidden)."""
    if row_block == col_block == 1:
        return t2
    return block_min_max(t2, row_block, col_block)[1]


def _heatmap(
    z: torch.Tensor,
    row_block: int,
    col_block: int,
    rows: int,
    cols: int,
    extreme: torch.Tensor | None = None,
) -> dict:
    # a numpy array: orjson writes it fast, and NaN/Infinity as null
    out = {
        "z": np.ascontiguousarray(z.numpy()),
        "row_block": row_block,
        "col_block": col_block,
        "rows": rows,
        "cols": cols,
    }
    if extreme is not None and (row_block > 1 or col_block > 1):
        out["extreme"] = np.ascontiguousarray(extreme.numpy())  # block means hide the extremes
    return out


def response_max_cells(sizes: list[int], max_cells: int, maps: int, total: int) -> int:
    """The largest cap m <= max_cells on each heatmap's cells such that `maps` heatmaps per
    gradient, of sizes `sizes` (entries), hold at most `total` cells in all: sum(min(size,
    m)) * maps <= total. A heatmap never holds more cells than its cap, so the response is
    bounded whatever max_cells asks for."""

    def cells(m: int) -> int:
        return maps * sum(min(size, m) for size in sizes)

    if cells(max_cells) <= total:
        return max_cells
    low, high = 1, max_cells  # cells(low) may be over when there are very many gradients
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if cells(mid) <= total else (low, mid - 1)
    return low


JSON_BYTES_PER_CELL = 25  # at most: "-1.2345678901234567e-05," (float64)


def tolerance_ratio(diff: torch.Tensor, r2: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """|manual - autograd| / (atol + rtol * |autograd|), in place over `diff` (a fresh copy),
    a few thousand rows at a time: <= 1 is exactly the check's allclose, entry by entry."""
    tiny = torch.finfo(diff.dtype).tiny  # 0 / (atol = 0) is 0, not NaN
    diff.abs_()
    for i in range(0, diff.shape[0], 4096):
        rows = slice(i, i + 4096)
        diff[rows].div_(r2[rows].abs().mul_(rtol).add_(atol).clamp_min_(tiny))
    return diff.clamp_(max=torch.finfo(diff.dtype).max)  # huge, but finite: drawn, not a gap


def gradient_view(
    t: torch.Tensor,
    max_cells: int,
    reference: torch.Tensor | None = None,
    tolerance: tuple[float, float] | None = None,
    difference: bool = True,
) -> dict:
    """Stats and heatmap of a gradient; with `reference` (autograd's), its heatmap on the
    same blocks and the difference's (`difference`: /api/run's `diff_heatmap`; the program
    page draws the tolerance's only); with the check's `tolerance` (rtol, atol) too, the
    difference in units of the tolerance (each block's largest). One pass of block minima and
    maxima gives both the heatmap's extremes and the stats' min and max."""
    view = own_view(t, max_cells)
    if reference is not None:
        add_reference(view, t, max_cells, reference, tolerance, difference)
    return view


def own_view(t: torch.Tensor, max_cells: int) -> dict:
    """`gradient_view` of `t` alone (no reference): what it is, whatever it is checked
    against (a program's are drawn while its float64 rerun is still on its way)."""
    t2 = as_2d(t.detach())
    rows, cols = t2.shape
    blocks = block_sizes(rows, cols, max_cells)
    whole = blocks == (1, 1)
    low_high = None if whole or t.numel() == 0 else block_min_max(t2, *blocks)
    st = stats(t, low_high)
    return {
        "shape": list(t.shape),
        "stats": st,
        "heatmap": _heatmap(
            block_mean(t2, *blocks),
            *blocks,
            rows,
            cols,
            None if low_high is None else extreme_of(*low_high),
        ),
        "nonfinite": count_nonfinite(t, st),
    }


def add_reference(
    view: dict,
    t: torch.Tensor,
    max_cells: int,
    reference: torch.Tensor,
    tolerance: tuple[float, float] | None = None,
    difference: bool = True,
) -> None:
    """`gradient_view`'s maps against `reference`, added to `t`'s own view, on its blocks."""
    t2 = as_2d(t.detach())
    rows, cols = t2.shape
    blocks = block_sizes(rows, cols, max_cells)
    r2 = as_2d(reference.detach())
    view["reference_heatmap"] = _heatmap(
        block_mean(r2, *blocks), *blocks, rows, cols, block_extreme(r2, *blocks)
    )
    diff = t2 - r2
    if difference:
        view["diff_heatmap"] = _heatmap(block_extreme(diff, *blocks), *blocks, rows, cols)
    if tolerance is not None:
        ratio = tolerance_ratio(diff, r2, *tolerance)
        view["tolerance_heatmap"] = _heatmap(block_max(ratio, *blocks), *blocks, rows, cols)


def significant(z: np.ndarray, digits: int) -> np.ndarray:
    """`z` rounded to `digits` significant digits, in its own dtype: orjson then writes each
    number as that short decimal ("0.0092189" for 0.009218882). Non-finite entries and 0
    are kept as they are."""
    wide = z.astype(np.float64)
    scaled = np.isfinite(wide) & (wide != 0)
    magnitude = np.floor(np.log10(np.abs(np.where(scaled, wide, 1.0))))
    scale = 10.0 ** (digits - 1 - magnitude)
    return np.where(scaled, np.round(wide * scale) / scale, wide).astype(z.dtype)


def at_precision(view: dict, digits: int) -> dict:
    """A gradient view's heatmaps (z and extremes) at `digits` significant digits, in place:
    the page shows 4 (its hover's `.4g`); one more keeps each entry within 5e-5 of its
    value, inside the check's float32 rtol (1e-4) for a reader of a full-size map."""
    at_precision_all([view], digits)
    return view


HEATMAP_KEYS = ("heatmap", "reference_heatmap", "diff_heatmap", "tolerance_heatmap")


def at_precision_all(views: list[dict], digits: int, keys: tuple[str, ...] = HEATMAP_KEYS) -> None:
    """`at_precision` over many views at once, in place: every map's numbers rounded in one
    pass per dtype (a program's 26 gradients have 78 small maps; one numpy pass over all of
    them instead of a dozen numpy calls per map). Entry by entry the same numbers."""
    slots: list[tuple[dict, str]] = []  # (heatmap, "z" or "extreme")
    pending = list(views)
    while pending:
        view = pending.pop()
        for key in keys:
            heatmap = view.get(key)
            if heatmap is not None:
                slots.extend((heatmap, part) for part in ("z", "extreme") if part in heatmap)
        if "autograd" in view:
            pending.append(view["autograd"])
    by_dtype: dict[np.dtype, list[tuple[dict, str]]] = {}
    for slot in slots:
        by_dtype.setdefault(slot[0][slot[1]].dtype, []).append(slot)
    for group in by_dtype.values():
        arrays = [heatmap[part] for heatmap, part in group]
        flat = significant(np.concatenate([a.reshape(-1) for a in arrays]), digits)
        start = 0
        for (heatmap, part), a in zip(group, arrays):
            heatmap[part] = flat[start : start + a.size].reshape(a.shape)
            start += a.size


SMALL_VALUES_MAX = 64  # entries per tensor (8 x 8): a run small enough to show its numbers


def small_values(env: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> dict | None:
    """Every forward tensor's and every manual gradient's values, when each has at most
    SMALL_VALUES_MAX entries (`batch=2, in_features=3, hidden=4`), so the page can show a
    step's numbers; None for anything larger (the response stays small and bounded)."""
    if any(t.numel() > SMALL_VALUES_MAX for t in (*env.values(), *grads.values())):
        return None
    return {
        "tensors": {n: t.detach().tolist() for n, t in env.items()},
        "grads": {n: t.detach().tolist() for n, t in grads.items()},
    }


def overflow_warnings(result: dict[str, Any]) -> list[str]:
    """Warnings like "overflow in w2.g: ..." for every gradient with non-finite entries (sent as null)."""
    found = []
    loss = result.get("loss")
    if loss is None or not math.isfinite(loss):
        found.append("overflow in loss: it is not finite (sent as null)")
    for name, view in result.get("gradients", {}).items():
        if view["nonfinite"]:
            total = math.prod(view["shape"])
            found.append(
                f"overflow in {name}.g: {view['nonfinite']} of {total} entries are not finite "
                "(sent as null)"
            )
    return found


MAX_IMAGES = 64  # digits, and hidden units drawn as images, sent at most


def unit_images(w: torch.Tensor, limit: int = MAX_IMAGES) -> np.ndarray:
    """A first layer's weights (pixels, units) as one flat image per unit: (units, pixels),
    the first `limit` units. What each unit looks at (or, for w1.g, how it would change)."""
    return np.ascontiguousarray(w.detach()[:, :limit].T.numpy())


def data_view(
    name: str,
    image_shape: tuple[int, int],
    pixels: torch.Tensor,
    labels: torch.Tensor,
    w1: torch.Tensor,
    w1_grad: torch.Tensor | None,
) -> dict[str, Any]:
    """The run's first digits (raw pixels) with their labels, and w1 / w1.g per unit."""
    view: dict[str, Any] = {
        "name": name,
        "image_shape": list(image_shape),
        "labels": labels[:MAX_IMAGES].tolist(),
        "images": np.ascontiguousarray(pixels[:MAX_IMAGES].numpy()),
        "units": w1.shape[1],
        "w1": unit_images(w1),
    }
    if w1_grad is not None:
        view["w1_grad"] = unit_images(w1_grad)
    return view
