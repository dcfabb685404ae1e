"""Indexing on meta tensors, where an index has a shape but no values: what the dry run
reads an index tensor as, and the most entries a bool mask can pick."""

from __future__ import annotations

from typing import Any

import torch


def meta_index(index: torch.Tensor) -> Any:
    """An index tensor as the dry run can use it: a 0-d integer tensor picks like the int 0
    would (the same shape; meta tensors have no value to read)."""
    if index.is_meta and index.ndim == 0 and not index.dtype.is_floating_point:
        return 0 if index.dtype != torch.bool else index
    return index


def meta_masked(t: torch.Tensor, parts: tuple) -> torch.Tensor:
    """`x[mask]` on meta tensors: how many entries a mask picks is data, so the dry run
    takes the most it can pick (every one): the shape (mask.numel(), *rest)."""
    if len(parts) != 1:
        raise IndexError("a bool mask indexes alone here: x[mask]")
    mask = parts[0]
    if tuple(mask.shape) != tuple(t.shape[: mask.ndim]):
        raise IndexError(
            f"the mask's shape {tuple(mask.shape)} does not match the indexed tensor's leading "
            f"dims {tuple(t.shape[: mask.ndim])}"
        )
    return torch.empty((mask.numel(), *t.shape[mask.ndim :]), dtype=t.dtype, device="meta")
