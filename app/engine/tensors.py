"""A run's tensors, made exactly as docs/API.md ("A run's tensors") says, so anyone can
reproduce a run."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from app.engine import data

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def lead_shape(batch: int | list[int]) -> tuple[int, ...]:
    """The leading dims of x: `1000` -> (1000,), `[4, 16]` -> (4, 16)."""
    return (batch,) if isinstance(batch, int) else tuple(batch)


def layer_sizes(in_features: int, hidden: list[int], out_features: int) -> list[tuple[int, int]]:
    """(fan_in, fan_out) of every linear layer: in -> hidden... -> out."""
    widths = [in_features, *hidden, out_features]
    return list(zip(widths[:-1], widths[1:]))


def init_gain(init: str, fan_in: int, fan_out: int) -> float:
    if init == "randn":
        return 1.0  # plain unscaled torch.randn, as in the article
    if init == "kaiming":
        return math.sqrt(2 / fan_in)
    if init == "xavier":
        return math.sqrt(2 / (fan_in + fan_out))
    raise ValueError(f"unknown init {init!r}")


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, shape and role, known before anything is allocated."""

    name: str
    shape: tuple[int, ...]
    role: str  # input, target, param, activation, output
    integer: bool = False  # class indices (cross-entropy's target)


def input_specs(cfg) -> list[TensorSpec]:
    """The tensors `make_tensors` creates, in creation order: x, target, then each layer's."""
    lead = lead_shape(cfg.batch)
    specs = [TensorSpec("x", (*lead, cfg.in_features), "input")]
    if cfg.loss == "cross_entropy":
        specs.append(TensorSpec("target", lead, "target", integer=True))
    elif cfg.out_features == 1:
        specs.append(TensorSpec("target", lead, "target"))
    else:
        specs.append(TensorSpec("target", (*lead, cfg.out_features), "target"))
    sizes = layer_sizes(cfg.in_features, cfg.hidden, cfg.out_features)
    for k, (fan_in, fan_out) in enumerate(sizes, start=1):
        specs.append(TensorSpec(f"w{k}", (fan_in, fan_out), "param"))
        specs.append(TensorSpec(f"b{k}", (fan_out,), "param"))
        if cfg.norm != "none" and k < len(sizes):
            specs.append(TensorSpec(f"gamma{k}", (fan_out,), "param"))
            specs.append(TensorSpec(f"beta{k}", (fan_out,), "param"))
    return specs


def data_name(cfg) -> str:
    return getattr(cfg, "data", "random")


def image_targets(labels: torch.Tensor, loss: str) -> torch.Tensor:
    """The digit: int64 class indices for cross_entropy, its value as a float for mse."""
    return labels if loss == "cross_entropy" else labels.double()


def examples(cfg, first: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image data's x (n, features) and target (n,), in the fixed order, in the run's dtype
    (the first `first` only, when given). Nothing is drawn from any generator."""
    ds = data.load(data_name(cfg))
    x, labels = (ds.x, ds.labels) if first is None else (ds.x[:first], ds.labels[:first])
    target = image_targets(labels, cfg.loss)
    dtype = DTYPES[cfg.dtype]
    return x.to(dtype), target if target.dtype == torch.int64 else target.to(dtype)


def make_tensors(cfg) -> dict[str, torch.Tensor]:
    """x, target and every parameter, from a per-run generator (never the global RNG).

    With image data, x and target are the data's first prod(batch) examples and draw
    nothing, so the weights are the same as for any batch."""
    lead = lead_shape(cfg.batch)
    g = torch.Generator().manual_seed(cfg.seed)
    if data_name(cfg) != "random":
        x, target = examples(cfg, math.prod(lead))
        tensors = {"x": x.reshape(*lead, cfg.in_features), "target": target.reshape(lead)}
    else:
        tensors = {"x": _first_draw(g, cfg.seed, (*lead, cfg.in_features))}
        if cfg.loss == "cross_entropy":
            tensors["target"] = torch.randint(cfg.out_features, lead, generator=g)
        elif cfg.out_features == 1:
            tensors["target"] = torch.randn(*lead, generator=g)
        else:
            tensors["target"] = torch.randn(*lead, cfg.out_features, generator=g)
    sizes = layer_sizes(cfg.in_features, cfg.hidden, cfg.out_features)
    for k, (fan_in, fan_out) in enumerate(sizes, start=1):
        scale = init_gain(cfg.init, fan_in, fan_out) * cfg.init_scale
        tensors[f"w{k}"] = torch.randn(fan_in, fan_out, generator=g) * scale
        tensors[f"b{k}"] = torch.randn(fan_out, generator=g) * scale
        if cfg.norm != "none" and k < len(sizes):
            tensors[f"gamma{k}"] = 1 + 0.1 * torch.randn(fan_out, generator=g)
            tensors[f"beta{k}"] = 0.1 * torch.randn(fan_out, generator=g)
    dtype = DTYPES[cfg.dtype]
    return {n: t if t.dtype == torch.int64 else t.to(dtype) for n, t in tensors.items()}


# The last run's x (its seed and shape) and the generator's state after drawing it. x is most
# of a run's draws (784k of the article's 825k numbers): a page that changes anything but
# the batch, the input size or the seed asks for the same x again.
_LAST_X: tuple[int, tuple[int, ...], torch.Tensor, torch.Tensor] | None = None
LAST_X_MAX_BYTES = 8 << 20  # kept only when small: the cache must not weigh on memory at rest


def _first_draw(g: torch.Generator, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """torch.randn(shape, generator=g) for a generator just seeded with `seed`: a copy of the
    last run's x when seed and shape match (the generator moved on as if it had drawn it)."""
    global _LAST_X
    hit = _LAST_X
    if hit is not None and hit[0] == seed and hit[1] == shape:
        g.set_state(hit[3])
        return hit[2].clone()  # a copy: no run ever shares its tensors with another
    x = torch.randn(*shape, generator=g)
    if x.numel() * x.element_size() <= LAST_X_MAX_BYTES:
        _LAST_X = (seed, shape, x.clone(), g.get_state())
    return x
