"""The tolerance every check uses: one manual gradient against autograd's.

Self-contained on purpose (torch only, no names from Broadprop): the exported files carry this
module's own source (app/export/lines.py `module_body`, by `inspect.getsource`), so the file's
check is this code, not a copy of it. app/check/autograd.py (runs), app/programs/check.py (programs), the
diagnosis and the finite differences all call `compare` from here.

An element passes when |manual - autograd| <= atol + rtol * |autograd|, with
atol = atol_scale * max|autograd| (per dtype, `TOLERANCES`): the absolute part scales with the
gradient, so tiny entries next to large ones do not fail on rounding alone, while an all-zero
(or otherwise wrong) gradient still fails on its large entries.
"""

import torch

# rtol, atol_scale. float32 sums over a batch round at ~1e-7 relative; 1e-4/1e-5 leaves a wide
# margin for deep nets while any real error in a formula is orders of magnitude larger.
TOLERANCES = {
    torch.float32: (1e-4, 1e-5),
    torch.float64: (1e-9, 1e-12),
}
NOISE_FACTOR = 4  # a gradient may differ from autograd by 4x their rounding errors together
# elements per comparison pass: its temporaries (the difference, |reference| and the verdict's
# mask, ~2.3 MB for float32) stay small beside the two gradients (the article's x: 784k
# entries, once cut at 1M it held 7 MB of temporaries; the run's peak extra memory on a fresh
# server, median of six, 39.1 -> 37.8 MB). max and allclose do not depend on the cut
COMPARE_CHUNK = 1 << 18


def compare(manual, reference, atol_floor=0.0, rounding_noise=0.0):
    """max abs error, max relative error (to max|reference|), allclose and exact.

    Chunk by chunk, so the temporaries stay a few MB however large the gradient. NaN compares
    false, so a non-finite entry on either side fails allclose (inf - inf is NaN too).
    `atol_floor` raises the scale of atol for a gradient that cancels to ~0 (a bias before a
    batchnorm); `rounding_noise` is the rounding error both sides carry (`noise_between`
    below): atol is never stricter than NOISE_FACTOR times it.
    """
    rtol, atol_scale = TOLERANCES[reference.dtype]
    if reference.numel() == 0:
        return dict(
            max_abs_err=0.0, max_rel_err=0.0, allclose=True, exact=True, rtol=rtol, atol=0.0
        )
    flat_m, flat_r = manual.reshape(-1), reference.reshape(-1)
    scale = torch.maximum(flat_r.max(), -flat_r.min()).item()  # max|reference|, NaN kept
    atol = max(atol_scale * max(scale, atol_floor), NOISE_FACTOR * rounding_noise)
    chunk_max, allclose = [], True
    for start in range(0, flat_r.numel(), COMPARE_CHUNK):
        m, r = flat_m[start : start + COMPARE_CHUNK], flat_r[start : start + COMPARE_CHUNK]
        diff = (m - r).abs_()
        chunk_max.append(diff.max())
        allclose &= bool((diff <= r.abs().mul_(rtol).add_(atol)).all())
    max_abs = torch.stack(chunk_max).max().item()
    if scale > 0:
        max_rel = max_abs / scale
    else:
        max_rel = 0.0 if max_abs == 0 else float("inf")
    return {
        "max_abs_err": max_abs,
        "max_rel_err": max_rel,
        "allclose": allclose,
        "exact": max_abs == 0,
        "rtol": rtol,
        "atol": atol,
    }


def noise_between(pairs):
    """The rounding error both sides carry: how far each side (autograd, manual) moves when it
    is computed again in the other precision. `pairs`: (value, value in the other precision),
    one per side. noise = |autograd - autograd'| + |manual - manual'|: by the triangle
    inequality, rounding alone cannot pull the two sides further apart than that; a wrong
    formula's error does not depend on the precision, so it stands far above it."""
    return sum(max_abs_diff(a, b, torch.float64) for a, b in pairs)


def max_abs_diff(a, b, dtype=None):
    """max|a - b|, chunk by chunk (0.0 when empty); `dtype`: both sides cast to it first,
    a chunk at a time."""
    if a.shape != b.shape:  # (broadcasting, or torch's error: whole, as it always was)
        a, b = (a, b) if dtype is None else (a.to(dtype), b.to(dtype))
        return (a - b).abs().max().item() if a.numel() and b.numel() else 0.0
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    chunk_max = []
    for i in range(0, flat_b.numel(), COMPARE_CHUNK):
        part_a, part_b = flat_a[i : i + COMPARE_CHUNK], flat_b[i : i + COMPARE_CHUNK]
        if dtype is not None:
            part_a, part_b = part_a.to(dtype), part_b.to(dtype)
        chunk_max.append((part_a - part_b).abs().max())
    return torch.stack(chunk_max).max().item() if chunk_max else 0.0  # (NaN kept)
