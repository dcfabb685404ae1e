"""Convolution and pooling as CS231n writes them: `F.unfold` / `F.fold` (im2col and its
adjoint), `F.pad`, `F.conv2d`, `F.max_pool2d`, `F.avg_pool2d`.

Every output's size is computed here, in Python, before torch sees the call: a giant `fold`
or a padding of 10**9 is a budget refusal at its line, never an overflow or an allocation.
Layouts: unfold (N, C, H, W) -> (N, C·kh·kw, L), the channel slowest and the kernel's column
fastest within a column of the result; L counts the windows row by row.
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F

from app.ops.making import MakeError, _bounded
from app.ops.traced import Traced, _fmt_scalar, made

MAX_PARAM = 1 << 16  # a kernel size, stride, padding or dilation


def pair(value: Any, what: str, low: int = 0) -> tuple[int, int]:
    """An int or a pair of ints (torch's `_pair`), each in [low, MAX_PARAM]."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        a, b = value
    else:
        a = b = value
    for v in (a, b):
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= MAX_PARAM:
            raise MakeError(f"{what} is a whole number (or a pair) from {low} to {MAX_PARAM}")
    return a, b


def _spatial(x: Traced, what: str) -> tuple[int, ...]:
    if x.ndim not in (3, 4):
        raise MakeError(f"{what} takes (N, C, H, W) (or (C, H, W)); got {x.ndim} dims", "shape")
    if not x.t.is_floating_point():
        raise MakeError(f"{what} takes a float tensor")
    return tuple(x.shape[-2:])


def _windows(size: int, k: int, s: int, p: int, d: int, ceil: bool = False) -> int:
    span = size + 2 * p - d * (k - 1) - 1
    if span < 0:
        return 0
    n = (span + (s - 1 if ceil else 0)) // s + 1
    if ceil and (n - 1) * s >= size + p:  # torch: the last window starts inside the input
        n -= 1
    return n


def _grid(x: Traced, k: tuple, s: tuple, p: tuple, d: tuple, what: str,
          ceil: bool = False) -> tuple[int, int]:  # fmt: skip
    h, w = _spatial(x, what)
    out = (_windows(h, k[0], s[0], p[0], d[0], ceil), _windows(w, k[1], s[1], p[1], d[1], ceil))
    if min(out) < 1:
        raise MakeError(f"{what}: a {k[0]}x{k[1]} kernel (dilation {d}, padding {p}) does not fit "
                        f"the input's {h}x{w}", "shape")  # fmt: skip
    return out


def _lead(x: Traced) -> int:
    return math.prod(x.shape[:-3]) * x.shape[-3]  # N * C


def _kw(**values: Any) -> str:
    return "".join(f", {k}={v}" for k, v in values.items() if v not in (1, (1, 1), 0, (0, 0)))


def _stride(stride: Any) -> str:
    return "" if stride is None else f", stride={stride!r}"


def unfold(x: Traced, kernel_size: Any, dilation: Any = 1, padding: Any = 0,
           stride: Any = 1) -> Traced:  # fmt: skip
    """`F.unfold(x, k)`: every k×k window as a column: (N, C·kh·kw, L)."""
    k, d = pair(kernel_size, "kernel_size", 1), pair(dilation, "dilation", 1)
    p, s = pair(padding, "padding"), pair(stride, "stride", 1)
    out = _grid(x, k, s, p, d, "F.unfold")
    _bounded(_lead(x) * k[0] * k[1] * out[0] * out[1], "F.unfold")
    t = F.unfold(x.t, k, d, p, s)
    expr = f"F.unfold({x.expr}, {kernel_size!r}{_kw(dilation=dilation, padding=padding, stride=stride)})"
    return made(t, expr, "copy", "unfold", [x], {"layout": "(N, C·kh·kw, L)"})


def fold(x: Traced, output_size: Any, kernel_size: Any, dilation: Any = 1, padding: Any = 0,
         stride: Any = 1) -> Traced:  # fmt: skip
    """`F.fold(cols, (H, W), k)`: unfold's adjoint, overlapping windows summed."""
    size, k = pair(output_size, "output_size", 1), pair(kernel_size, "kernel_size", 1)
    d, p, s = pair(dilation, "dilation", 1), pair(padding, "padding"), pair(stride, "stride", 1)
    if x.ndim not in (2, 3) or x.shape[-2] % (k[0] * k[1]):
        raise MakeError(f"F.fold takes (N, C·kh·kw, L) with C·kh·kw a multiple of "
                        f"{k[0] * k[1]}; got {tuple(x.shape)}", "shape")  # fmt: skip
    windows = [_windows(size[i], k[i], s[i], p[i], d[i]) for i in (0, 1)]
    if windows[0] * windows[1] != x.shape[-1]:
        raise MakeError(f"F.fold: a {size[0]}x{size[1]} output has {windows[0]}x{windows[1]} "
                        f"windows, but the input has L = {x.shape[-1]}", "shape")  # fmt: skip
    channels = x.shape[-2] // (k[0] * k[1])
    _bounded(math.prod(x.shape[:-2]) * channels * size[0] * size[1], "F.fold")
    t = F.fold(x.t, size, k, d, p, s)
    expr = (f"F.fold({x.expr}, {output_size!r}, {kernel_size!r}"
            f"{_kw(dilation=dilation, padding=padding, stride=stride)})")  # fmt: skip
    # each entry of the output sums up to kh·kw windows' entries: the work is the input's
    return made(t, expr, "reduce", "fold", [x], {"reduced_dims": []})


def pad(x: Traced, amounts: Any, mode: str = "constant", value: Any = 0) -> Traced:
    """`F.pad(x, (left, right, top, bottom, ...))`: constant padding (negative crops)."""
    if mode != "constant":
        raise MakeError("F.pad here pads with a constant (mode='constant')")
    if not isinstance(amounts, (tuple, list)) or len(amounts) % 2 or len(amounts) // 2 > x.ndim:
        raise MakeError(f"F.pad takes pairs of amounts, last dim first: at most {x.ndim} pairs")
    if not all(isinstance(a, int) and abs(a) <= MAX_PARAM for a in amounts):
        raise MakeError(f"F.pad's amounts are whole numbers up to {MAX_PARAM}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise MakeError("F.pad's value is a number")
    shape = list(x.shape)
    for i in range(len(amounts) // 2):
        shape[-1 - i] += amounts[2 * i] + amounts[2 * i + 1]
    if min(shape, default=1) < 0:
        raise MakeError(f"F.pad crops more than the tensor has: {tuple(shape)}", "shape")
    _bounded(math.prod(shape), "F.pad")
    t = F.pad(x.t, tuple(amounts), value=value)
    extra = f", value={_fmt_scalar(value)}" if value else ""
    return made(t, f"F.pad({x.expr}, {tuple(amounts)!r}{extra})", "copy", "pad", [x])


def conv2d(x: Traced, weight: Traced, bias: Traced | None = None, stride: Any = 1,
           padding: Any = 0, dilation: Any = 1, groups: int = 1) -> Traced:  # fmt: skip
    """`F.conv2d(x, w, b)`: (N, Cin, H, W) * (Cout, Cin/groups, kh, kw) -> (N, Cout, Ho, Wo)."""
    if not isinstance(weight, Traced) or weight.ndim != 4:
        raise MakeError("F.conv2d's weight is (C_out, C_in / groups, kh, kw)", "shape")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise MakeError("groups= is a whole number >= 1")
    if bias is not None and not isinstance(bias, Traced):
        raise MakeError("F.conv2d's bias is a tensor (C_out,) or None")
    s, p, d = pair(stride, "stride", 1), pair(padding, "padding"), pair(dilation, "dilation", 1)
    k = tuple(weight.shape[2:])
    if x.ndim == 4 and x.shape[1] != weight.shape[1] * groups:
        raise MakeError(f"F.conv2d: the input has {x.shape[1]} channels, the weight "
                        f"{tuple(weight.shape)} takes {weight.shape[1] * groups}", "shape")  # fmt: skip
    out = _grid(x, k, s, p, d, "F.conv2d")
    lead = math.prod(x.shape[:-3])
    entries = lead * weight.shape[0] * out[0] * out[1]
    _bounded(entries, "F.conv2d")
    t = F.conv2d(x.t, weight.t, None if bias is None else bias.t, s, p, d, groups)
    operands = [x, weight] + ([bias] if bias is not None else [])
    args = ", ".join(o.expr for o in operands)
    expr = (
        f"F.conv2d({args}{_kw(stride=stride, padding=padding, dilation=dilation, groups=groups)})"
    )
    flops = 2 * entries * weight.shape[1] * k[0] * k[1]
    # im2col's columns on the CPU: N·Cin·kh·kw·L floats
    cols = lead * x.shape[-3] * k[0] * k[1] * out[0] * out[1] * x.t.element_size()
    return made(t, expr, "conv", "conv2d", operands, {"flops": flops, "temp_bytes": cols})


def max_pool2d(x: Traced, kernel_size: Any, stride: Any = None, padding: Any = 0,
               dilation: Any = 1, ceil_mode: bool = False,
               return_indices: bool = False) -> Any:  # fmt: skip
    """`F.max_pool2d(x, k)`: each window's largest entry (with `return_indices=True`, also
    where it is: the flat index into H·W, as max_unpool2d reads it)."""
    k = pair(kernel_size, "kernel_size", 1)
    s = k if stride is None else pair(stride, "stride", 1)
    p, d = pair(padding, "padding"), pair(dilation, "dilation", 1)
    if p[0] * 2 > k[0] or p[1] * 2 > k[1]:
        raise MakeError("F.max_pool2d: padding is at most half the kernel size")
    if not isinstance(ceil_mode, bool) or not isinstance(return_indices, bool):
        raise MakeError("ceil_mode= and return_indices= are True or False")
    out = _grid(x, k, s, p, d, "F.max_pool2d", ceil_mode)
    _bounded(_lead(x) * out[0] * out[1], "F.max_pool2d")
    values, indices = F.max_pool2d(x.t, k, s, p, d, ceil_mode, return_indices=True)
    extra = _stride(stride) + _kw(padding=padding, dilation=dilation)
    expr = (
        f"F.max_pool2d({x.expr}, {kernel_size!r}{extra}{', ceil_mode=True' if ceil_mode else ''})"
    )
    work = {"reduced_dims": [], "window": k[0] * k[1]}
    pooled = made(values, expr, "reduce", "max_pool2d", [x], work)
    if not return_indices:
        return pooled
    where = made(indices, f"{expr}[1]", "reduce", "max_pool2d_indices", [x], dict(work))
    return (pooled, where)


def avg_pool2d(x: Traced, kernel_size: Any, stride: Any = None, padding: Any = 0,
               ceil_mode: bool = False, count_include_pad: bool = True) -> Traced:  # fmt: skip
    """`F.avg_pool2d(x, k)`: each window's mean."""
    k = pair(kernel_size, "kernel_size", 1)
    s = k if stride is None else pair(stride, "stride", 1)
    p = pair(padding, "padding")
    if p[0] * 2 > k[0] or p[1] * 2 > k[1]:
        raise MakeError("F.avg_pool2d: padding is at most half the kernel size")
    if not isinstance(ceil_mode, bool) or not isinstance(count_include_pad, bool):
        raise MakeError("ceil_mode= and count_include_pad= are True or False")
    out = _grid(x, k, s, p, (1, 1), "F.avg_pool2d", ceil_mode)
    _bounded(_lead(x) * out[0] * out[1], "F.avg_pool2d")
    t = F.avg_pool2d(x.t, k, s, p, ceil_mode, count_include_pad)
    extra = _stride(stride) + _kw(padding=padding)
    expr = f"F.avg_pool2d({x.expr}, {kernel_size!r}{extra})"
    return made(t, expr, "reduce", "avg_pool2d", [x], {"reduced_dims": [], "window": k[0] * k[1]})
