"""The check's tolerance (app/check/tolerance.py) over many gradients at once.

A program's check compares every gradient it wrote (makemore: 26, most of a few hundred
entries) twice, in its dtype and in float64, and measures each one's rounding noise. One
`compare` is a dozen torch calls of a few microseconds each, whatever the tensor's size, so
small gradients cost their calls, not their numbers. Here the gradients of one dtype are laid
end to end once and every result comes from a few numpy passes (`reduceat` over each
gradient's own stretch).

Entry by entry the arithmetic is `compare`'s and `noise_between`'s: the same dtype, the same
operations in the same order (|manual - autograd| <= atol + rtol * |autograd| in the
gradient's own dtype, maxima taken exactly, NaN kept), so every result is the one they give;
tests/check/test_batched.py holds them to that. Anything else (another dtype, shapes that
differ, no entries) goes to `compare` / `noise_between` themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from app.check.tolerance import NOISE_FACTOR, TOLERANCES, compare, noise_between

NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}

Pair = tuple[torch.Tensor, torch.Tensor]


class Flats:
    """Each tensor's entries as a flat numpy array, made once for all the passes of one check
    (a gradient is laid out three times: its comparison, its rounding noise, its float64
    rerun's comparison; makemore's check made 208 arrays for 104 tensors). It holds every
    tensor it was asked for, so no id is reused while it lives; a tensor whose entries are not
    contiguous is laid out each time, so no copy is held beyond its pass."""

    def __init__(self) -> None:
        self._made: dict[int, tuple[torch.Tensor, np.ndarray]] = {}

    def __call__(self, t: torch.Tensor) -> np.ndarray:
        if not t.is_contiguous():  # its flat entries are a copy: made each time, not held
            return _flat(t)
        made = self._made.get(id(t))
        if made is None or made[0] is not t:
            made = self._made[id(t)] = (t, _flat(t))
        return made[1]


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.detach().reshape(-1).numpy()


def compare_many(
    pairs: Sequence[Pair], noises: Sequence[float], flats: Flats | None = None
) -> list[dict]:
    """`[compare(manual, reference, rounding_noise=noise) for ...]`, for pairs of one dtype
    and shape each (the manual already in the reference's dtype). `flats`: the check's own,
    shared by its passes."""
    results: list[dict | None] = [None] * len(pairs)
    groups: dict[torch.dtype, list[int]] = {}
    for i, (m, r) in enumerate(pairs):
        if _batchable(m, r):
            groups.setdefault(r.dtype, []).append(i)
        else:
            results[i] = compare(m, r, rounding_noise=noises[i])
    for dtype, members in groups.items():
        rtol, atol_scale = TOLERANCES[dtype]
        kind = NUMPY_DTYPES[dtype]
        m, r, starts, sizes = _laid_out([pairs[i] for i in members], flats=flats)
        abs_r = np.abs(r)
        scales = np.maximum.reduceat(abs_r, starts).tolist()  # max|reference|, NaN kept
        atols = [
            max(atol_scale * max(scale, 0.0), NOISE_FACTOR * noises[i])
            for scale, i in zip(scales, members)
        ]  # (compare's own expression, atol_floor 0)
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is NaN, as in torch
            diff = np.abs(m - r)
        max_abs = np.maximum.reduceat(diff, starts).tolist()
        bound = abs_r * kind(rtol)
        bound += np.repeat(np.asarray(atols, dtype=kind), sizes)
        within = np.logical_and.reduceat(diff <= bound, starts).tolist()
        for i, scale, atol, err, ok in zip(members, scales, atols, max_abs, within):
            if scale > 0:
                rel = err / scale
            else:
                rel = 0.0 if err == 0 else float("inf")
            results[i] = {"max_abs_err": err, "max_rel_err": rel, "allclose": bool(ok),
                          "exact": err == 0, "rtol": rtol, "atol": atol}  # fmt: skip
    return results  # type: ignore[return-value]


def noise_many(quads: Sequence[tuple[Pair, Pair]], flats: Flats | None = None) -> list[float]:
    """`[noise_between(pairs) for pairs in quads]`, each `pairs` being ((manual, manual in
    the other precision), (autograd, autograd in the other precision)). `flats`: as
    `compare_many`'s."""
    results: list[float | None] = [None] * len(quads)
    batched: list[int] = []
    for i, pairs in enumerate(quads):
        tensors = [t for pair in pairs for t in pair]
        shape = tensors[0].shape
        if (len(pairs) == 2 and all(t.shape == shape for t in tensors) and tensors[0].numel()
                and all(t.dtype in NUMPY_DTYPES for t in tensors)):  # fmt: skip
            batched.append(i)
        else:
            results[i] = noise_between(pairs)
    if batched:
        sides = []
        for side in (0, 1):  # the manual's move, then autograd's, as noise_between adds them
            a, b, starts, _ = _laid_out([quads[i][side] for i in batched], np.float64, flats)
            with np.errstate(invalid="ignore", over="ignore"):
                sides.append(np.maximum.reduceat(np.abs(a - b), starts).tolist())
        for i, manual_move, autograd_move in zip(batched, *sides):
            results[i] = 0 + manual_move + autograd_move  # sum()'s order
    return results  # type: ignore[return-value]


def _batchable(m: torch.Tensor, r: torch.Tensor) -> bool:
    return r.dtype in NUMPY_DTYPES and m.dtype == r.dtype and m.shape == r.shape and r.numel() > 0


def _laid_out(
    pairs: Sequence[Pair], dtype: type | None = None, flats: Flats | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Both sides of every pair end to end (as `dtype`, when given: float32 widens exactly),
    with where each pair starts and its size."""
    sizes = [r.numel() for _, r in pairs]
    starts = np.zeros(len(sizes), dtype=np.intp)
    np.cumsum(sizes[:-1], out=starts[1:])
    sides = []
    for side in (0, 1):
        flat = [(flats or _flat)(pair[side]) for pair in pairs]
        joined = np.concatenate(flat) if len(flat) > 1 else flat[0]
        sides.append(joined.astype(dtype, copy=False) if dtype is not None else joined)
    return sides[0], sides[1], starts, sizes
