"""The layers of the chapters after the MLP, as `torch.nn.functional` calls: `F.gelu`,
`F.layer_norm`, `F.embedding`; masks (`masked_fill`, `argmax`) and the writes a backward
accumulates with (`index_add_`, `scatter_add_`, `index_put_(accumulate=True)`,
`masked_fill_`), each meaning exactly what it means in PyTorch."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from app.ops.making import MakeError
from app.ops.traced import Traced, _fmt_scalar, made


def gelu(x: Traced, approximate: str = "none") -> Traced:
    """`F.gelu(x)`: x·Φ(x); `approximate='tanh'`: GPT-2's 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))."""
    if approximate not in ("none", "tanh"):
        raise MakeError("approximate= is 'none' or 'tanh'")
    extra = ", approximate='tanh'" if approximate == "tanh" else ""
    t = F.gelu(x.t, approximate=approximate)
    return made(t, f"F.gelu({x.expr}{extra})", "elementwise", "gelu", [x])


def layer_norm(x: Traced, normalized_shape: Any, weight: Traced | None = None,
               bias: Traced | None = None, eps: float = 1e-5) -> Traced:  # fmt: skip
    """`F.layer_norm(x, (C,), w, b, eps)`: (x - mean) / sqrt(var + eps) * w + b over the last
    dims (var divides by n, not n - 1)."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    if not isinstance(shape, (tuple, list)) or not all(isinstance(s, int) for s in shape):
        raise MakeError("F.layer_norm's normalized_shape is a size or a tuple of sizes")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
        raise MakeError("eps= is a number >= 0")
    operands = [x] + [o for o in (weight, bias) if o is not None]
    if not all(isinstance(o, Traced) for o in operands):
        raise MakeError("F.layer_norm's weight and bias are tensors (or None)")
    t = F.layer_norm(x.t, tuple(shape), None if weight is None else weight.t,
                     None if bias is None else bias.t, eps)  # fmt: skip
    args = ", ".join([x.expr, repr(tuple(shape))] + [o.expr for o in operands[1:]])
    extra = "" if eps == 1e-5 else f", eps={_fmt_scalar(eps)}"
    # two passes over x (the mean, the variance), then the normalized output
    return made(t, f"F.layer_norm({args}{extra})", "elementwise", "layer_norm", operands,
                {"temp_bytes": 2 * x.t.numel() * x.t.element_size()})  # fmt: skip


def embedding(ids: Traced, weight: Traced) -> Traced:
    """`F.embedding(ids, W)`: W's rows picked by ids, (*ids.shape, D): `W[ids]`."""
    if not isinstance(ids, Traced) or not isinstance(weight, Traced):
        raise MakeError("F.embedding(ids, weight) takes two tensors")
    if ids.t.is_floating_point() or weight.ndim != 2:
        raise MakeError(f"F.embedding takes integer ids and a 2-D weight; got ids "
                        f"{ids.t.dtype} and weight {tuple(weight.shape)}", "shape")  # fmt: skip
    t = F.embedding(ids.t, weight.t)
    return made(t, f"F.embedding({ids.expr}, {weight.expr})", "index", "embedding", [ids, weight])


def masked_fill(x: Traced, mask: Traced, value: Any, in_place: bool = False) -> Traced:
    """`x.masked_fill(mask, value)`: value where the (broadcast) bool mask holds."""
    if not isinstance(mask, Traced) or mask.t.dtype != torch.bool:
        raise MakeError(".masked_fill takes a bool mask (e.g. mask == 0) and a value")
    if isinstance(value, Traced):
        if value.ndim:
            raise MakeError(".masked_fill's value is a number (or a 0-d tensor)")
        fill: Any = value.t
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        fill = value
        if isinstance(value, float) and math.isnan(value):
            fill = value
    else:
        raise MakeError(".masked_fill's value is a number, e.g. float('-inf')")
    name = "masked_fill_" if in_place else "masked_fill"
    shown = value.expr if isinstance(value, Traced) else _fmt_scalar(value)
    expr = f"{x._wrapped(4)}.{name}({mask.expr}, {shown})"
    if in_place:
        x.t.masked_fill_(mask.t, fill)
        return made(x.t, expr, "write", name, [x, mask], {"in_place": True})
    detail = {}
    if mask.shape != x.shape and x.t.is_meta:
        from app.ops.broadcast import broadcast_rule

        detail["broadcast"] = broadcast_rule(x.shape, mask.shape).as_dict()
    return made(x.t.masked_fill(mask.t, fill), expr, "mask", name, [x, mask], detail)


def arg_extreme(x: Traced, op: str, dim: int | None = None, keepdim: bool = False) -> Traced:
    """`x.argmax(dim)` / `argmin`: where the largest (smallest) entry is, int64."""
    t = getattr(x.t, op)(dim, keepdim=keepdim)
    args = "" if dim is None else f"{dim}" + (", keepdim=True" if keepdim else "")
    dims = list(range(x.ndim)) if dim is None else [dim % max(x.ndim, 1)]
    return made(t, f"{x._wrapped(4)}.{op}({args})", "reduce", op, [x], {"reduced_dims": dims})


def cast(x: Traced, dtype: torch.dtype) -> Traced:
    """`.bool()` / `.long()`: a mask or indices in another integer type."""
    name = {torch.bool: "bool", torch.int64: "long"}[dtype]
    return made(x.t.to(dtype), f"{x._wrapped(4)}.{name}()", "mask", name, [x])


def contiguous(x: Traced) -> Traced:
    """`.contiguous()`: itself when it is, else a copy (a transposed view's)."""
    action = "reshape" if x.t.is_contiguous() else "copy"
    return made(x.t.contiguous(), f"{x._wrapped(4)}.contiguous()", action, "contiguous", [x])


def _index(index: Any, what: str) -> Traced:
    if not isinstance(index, Traced) or index.t.is_floating_point():
        raise MakeError(f"{what} takes an integer index tensor")
    return index


def index_add(x: Traced, dim: int, index: Traced, source: Traced, alpha: float = 1,
              in_place: bool = False) -> Traced:  # fmt: skip
    """`x.index_add_(dim, index, source)`: source's slices added at index along dim, repeated
    indices accumulating (an embedding's gradient)."""
    _index(index, ".index_add_")
    if index.ndim != 1:
        raise MakeError(f".index_add takes a 1-D index; got {tuple(index.shape)} (flatten it "
                        "with .view(-1), and the source to match)", "shape")  # fmt: skip
    name = "index_add_" if in_place else "index_add"
    extra = "" if alpha == 1 else f", alpha={_fmt_scalar(alpha)}"
    expr = f"{x._wrapped(4)}.{name}({dim}, {index.expr}, {source.expr}{extra})"
    if in_place:
        x.t.index_add_(dim, index.t, source.t, alpha=alpha)
        return made(x.t, expr, "write", name, [x, index, source], {"in_place": True})
    t = x.t.index_add(dim, index.t, source.t, alpha=alpha)
    return made(t, expr, "index", name, [x, index, source])


def scatter_add(x: Traced, dim: int, index: Traced, src: Traced, in_place: bool = False) -> Traced:
    """`x.scatter_add_(dim, index, src)`: x[..., index[i], ...] += src[i] along dim, repeated
    indices accumulating (max-pool's gradient routed to each window's max)."""
    _index(index, ".scatter_add")
    if not isinstance(src, Traced):
        raise MakeError(".scatter_add's src is a tensor")
    name = "scatter_add_" if in_place else "scatter_add"
    expr = f"{x._wrapped(4)}.{name}({dim}, {index.expr}, {src.expr})"
    if in_place:
        x.t.scatter_add_(dim, index.t, src.t)
        return made(x.t, expr, "write", name, [x, index, src], {"in_place": True})
    return made(x.t.scatter_add(dim, index.t, src.t), expr, "index", name, [x, index, src])


def index_put(x: Traced, indices: Any, values: Any, accumulate: bool = False,
              in_place: bool = False) -> Traced:  # fmt: skip
    """`x.index_put_((i, j), v, accumulate=True)`: x[i, j] += v with repeated indices
    accumulating (`accumulate=False`: one write per index, as `x[i, j] = v`)."""
    if not isinstance(indices, (tuple, list)) or not indices:
        raise MakeError(".index_put takes a tuple of index tensors: x.index_put_((ids,), v)")
    for i in indices:
        if not isinstance(i, Traced) or (i.t.is_floating_point()):
            raise MakeError(".index_put's indices are integer (or bool) tensors")
    if not isinstance(accumulate, bool):
        raise MakeError("accumulate= is True or False")
    if isinstance(values, Traced):
        update, shown = values.t, values.expr
    elif isinstance(values, (int, float)) and not isinstance(values, bool):
        update, shown = (
            torch.tensor(values, dtype=x.t.dtype, device=x.t.device),
            _fmt_scalar(values),
        )
    else:
        raise MakeError(".index_put's values are a tensor or a number")
    name = "index_put_" if in_place else "index_put"
    raw = tuple(i.t for i in indices)
    listed = ", ".join(i.expr for i in indices) + ("," if len(indices) == 1 else "")
    expr = f"{x._wrapped(4)}.{name}(({listed}), {shown}{', accumulate=True' if accumulate else ''})"
    operands = [x, *indices] + ([values] if isinstance(values, Traced) else [])
    if in_place:
        x.t.index_put_(raw, update, accumulate=accumulate)
        return made(x.t, expr, "write", name, operands, {"in_place": True})
    return made(x.t.index_put(raw, update, accumulate=accumulate), expr, "index", name, operands)
