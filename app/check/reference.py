"""The reference network: the contract's forward pass, written once with torch's own
functions (torch.nn.functional), independently of app.ops, so that a mistake in an op's
forward cannot hide the same mistake in its checks.

Every witness uses this one copy: the autograd check (app/check/autograd.py) differentiates
`forward` on fresh leaves, the finite differences (app/check/fd.py) evaluate it in float64
from any stage (`forward_from`), and the exported file (app/export/) carries these functions'
own source. Annotations name only builtins and torch, so the source runs as it is in a file
that imports torch alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The contract's constants, stated here again rather than imported from app.ops, so that a
# wrong constant on the manual side cannot be wrong on the reference side too.
NORM_EPS = 1e-5
REFERENCE_LEAKY_SLOPE = 0.01


def linear(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(*B, in) @ (in, out) + (out,) -> (*B, out)."""
    return torch.matmul(a, w) + b


def normalize(norm: str, z: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """z (*B, h) normalized as the contract says: layernorm over its last dim, batchnorm
    with the statistics of every leading position; "none" leaves it as it is."""
    if norm == "layernorm":
        return F.layer_norm(z, z.shape[-1:], gamma, beta, NORM_EPS)
    if norm == "batchnorm":
        flat = z.reshape(-1, z.shape[-1])  # (rows, h): every leading position is a row
        flat = F.batch_norm(flat, None, None, gamma, beta, True, 0.0, NORM_EPS)
        return flat.reshape(z.shape)
    return z


def activation(name: str, z: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return torch.relu(z)  # gradient 0 at exactly 0, as (z > 0); clamp_min would give 1
    if name == "leaky_relu":
        return F.leaky_relu(z, REFERENCE_LEAKY_SLOPE)
    if name == "tanh":
        return torch.tanh(z)
    if name == "sigmoid":
        return torch.sigmoid(z)
    raise ValueError(f"unknown activation {name!r}")


def loss_of(cfg, out: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """mse against the target (a (*B,) target beside a (*B, 1) output: the output squeezed),
    or cross-entropy over every leading position. (Not `loss`: a file that carries this
    source has a tensor of that name.)"""
    if cfg.loss == "mse":
        if cfg.out_features == 1 and out.shape != target.shape:
            out = out.squeeze(-1)
        return F.mse_loss(out, target, reduction=reduction)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1), reduction=reduction)


def forward(
    cfg, leaves: dict[str, torch.Tensor], stages: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """The loss of the contract's network on `leaves` (x, target, and w{k}, b{k}, gamma{k},
    beta{k} by name). With `stages`, every intermediate goes there by name as it is made:
    l{k}, n{k} (with a norm), a{k} and out."""
    l1 = linear(leaves["x"], leaves["w1"], leaves["b1"])
    return forward_from(cfg, leaves, 1, l1, stages)


def forward_keeping(
    cfg, leaves: dict[str, torch.Tensor], keep: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The loss, as `forward`; every intermediate that needs a gradient (out, l{k}, n{k},
    a{k}) goes into `keep` and keeps its gradient (`retain_grad`), so the check compares it
    too."""
    stages: dict[str, torch.Tensor] = {}
    loss = forward(cfg, leaves, stages)
    for name, t in stages.items():
        if t.requires_grad:
            t.retain_grad()
            keep[name] = t
    return loss


def forward_from(
    cfg,
    leaves: dict[str, torch.Tensor],
    k: int,
    z: torch.Tensor,
    stages: dict[str, torch.Tensor] | None = None,
    normed: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """The loss from layer k on: `z` is its linear output l{k}, or with `normed` its
    normalized n{k}. Each hidden layer is linear -> norm -> activation; the last, linear."""
    n_layers = len(cfg.hidden) + 1
    while k < n_layers:
        if not normed:
            _stage(stages, f"l{k}", z)
            z = normalize(cfg.norm, z, leaves.get(f"gamma{k}"), leaves.get(f"beta{k}"))
        if cfg.norm != "none":
            _stage(stages, f"n{k}", z)
        a = _stage(stages, f"a{k}", activation(cfg.activation, z))
        k, normed = k + 1, False
        z = linear(a, leaves[f"w{k}"], leaves[f"b{k}"])
    _stage(stages, "out", z)
    return loss_of(cfg, z, leaves["target"], reduction)


def _stage(stages: dict[str, torch.Tensor] | None, name: str, t: torch.Tensor) -> torch.Tensor:
    if stages is not None:
        stages[name] = t
    return t
