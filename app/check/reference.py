"""The reference network: the contract's forward pass, written once with torch's own
functions (torch.nn.functional), independently of app.ops, so that a mistake in an op's
forward cannot hide the same mistake in its checks.

Both witnesses use it: the autograd check (app/check/autograd.py) differentiates it on the run's
tensors, and the finite differences (app/check/fd.py) evaluate it in float64, stage by stage.
"""

from __future__ import annotations

from collections.abc import Mapping

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
        flat = z.reshape(-1, z.shape[-1])
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


def loss(cfg, out: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """mse against the target (a (*B,) target beside a (*B, 1) output: the output squeezed),
    or cross-entropy over every leading position."""
    if cfg.loss == "mse":
        if cfg.out_features == 1 and out.shape != target.shape:
            out = out.squeeze(-1)
        return F.mse_loss(out, target, reduction=reduction)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1), reduction=reduction)


def hidden(cfg, k: int, z: torch.Tensor, leaves: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Hidden layer k after its linear output z = l{k}: the norm, then the activation."""
    gamma, beta = leaves.get(f"gamma{k}"), leaves.get(f"beta{k}")
    return activation(cfg.activation, normalize(cfg.norm, z, gamma, beta))
