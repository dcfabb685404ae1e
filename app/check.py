"""The check: every manual gradient against torch.autograd on fresh leaves.

The reference forward pass is written independently of app.ops, with torch.nn.functional,
so a mistake in an op's forward cannot hide the same mistake in its check.

Tolerances (per dtype): an element passes when |manual - autograd| <= atol + rtol * |autograd|
with atol = atol_scale * max|autograd|. The absolute part scales with the gradient, so tiny
entries next to large ones do not fail on rounding alone, while an all-zero (or otherwise
wrong) manual gradient still fails on the large entries. Both are reported per tensor.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from app.ops.activations import LEAKY_SLOPE

NORM_EPS = 1e-5
# rtol, atol_scale. float32 sums over a batch round at ~1e-7 relative; 1e-4/1e-5 leaves a wide
# margin for deep nets while any real error in a formula is orders of magnitude larger.
TOLERANCES = {
    torch.float32: (1e-4, 1e-5),
    torch.float64: (1e-9, 1e-12),
}


def reference_loss(cfg, leaves: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The loss, computed with torch's own ops so autograd can differentiate it."""
    n_layers = len(cfg.hidden) + 1
    a = leaves["x"]
    for k in range(1, n_layers + 1):
        z = torch.matmul(a, leaves[f"w{k}"]) + leaves[f"b{k}"]
        if k == n_layers:
            out = z
            break
        if cfg.norm == "layernorm":
            z = F.layer_norm(z, z.shape[-1:], leaves[f"gamma{k}"], leaves[f"beta{k}"], NORM_EPS)
        elif cfg.norm == "batchnorm":  # batch statistics over every leading dim
            flat = z.reshape(-1, z.shape[-1])
            flat = F.batch_norm(
                flat, None, None, leaves[f"gamma{k}"], leaves[f"beta{k}"], True, 0.0, NORM_EPS
            )
            z = flat.reshape(z.shape)
        a = activation_reference(cfg.activation, z)
    target = leaves["target"]
    if cfg.loss == "mse":
        if cfg.out_features == 1:
            return F.mse_loss(out.squeeze(-1), target)
        return F.mse_loss(out, target)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


def activation_reference(name: str, z: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return torch.relu(z)  # gradient 0 at exactly 0, as (z > 0); clamp_min would give 1
    if name == "leaky_relu":
        return F.leaky_relu(z, LEAKY_SLOPE)
    if name == "tanh":
        return torch.tanh(z)
    if name == "sigmoid":
        return torch.sigmoid(z)
    raise ValueError(f"unknown activation {name!r}")


def autograd_gradients(cfg, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """d loss / d every float input, by loss.backward() on fresh leaves.

    `detach()` makes new leaves that share storage with the run's tensors: nothing is copied.
    """
    leaves = {
        n: t.detach().requires_grad_(t.is_floating_point()) if n != "target" else t
        for n, t in tensors.items()
    }
    with torch.enable_grad():
        reference_loss(cfg, leaves).backward()
    return {n: t.grad for n, t in leaves.items() if n != "target"}


def compare(manual: torch.Tensor, reference: torch.Tensor) -> dict[str, float | bool | None]:
    """max abs error, max relative error (to max|reference|), allclose and exact.

    One pass each over |diff| and |reference|. NaN compares false, so a non-finite entry on
    either side fails allclose (inf - inf is NaN too).
    """
    rtol, atol_scale = TOLERANCES[reference.dtype]
    if reference.numel() == 0:
        return dict(max_abs_err=0.0, max_rel_err=0.0, allclose=True, exact=True, rtol=rtol, atol=0.0)
    diff = (manual - reference).abs()
    ref_abs = reference.abs()
    scale = ref_abs.max().item()
    max_abs = diff.max().item()
    if scale > 0:
        max_rel = max_abs / scale
    else:
        max_rel = 0.0 if max_abs == 0 else float("inf")
    atol = atol_scale * scale
    allclose = bool((diff <= ref_abs.mul_(rtol).add_(atol)).all())
    return {
        "max_abs_err": max_abs,
        "max_rel_err": max_rel,
        "allclose": allclose,
        "exact": max_abs == 0,
        "rtol": rtol,
        "atol": atol,
    }


def autograd_check(
    cfg, tensors: Mapping[str, torch.Tensor], manual: Mapping[str, torch.Tensor]
) -> dict:
    reference = autograd_gradients(cfg, tensors)
    per_tensor = {name: compare(manual[name], reference[name]) for name in reference}
    return {
        "reference": "torch.autograd",
        "all_close": all(c["allclose"] for c in per_tensor.values()),
        "tensors": per_tensor,
    }
