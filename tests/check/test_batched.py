"""app/check/batched.py gives, gradient by gradient, exactly what `compare` and
`noise_between` give: the program's check makes them all at once."""

from __future__ import annotations

import math

import pytest
import torch

from app.check.batched import Flats, compare_many, noise_many
from app.check.tolerance import compare, noise_between


def _same(a: dict, b: dict) -> bool:
    """Equal dicts, NaN equal to NaN (a non-finite gradient's errors)."""
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            continue
        if x != y or type(x) is not type(y):
            return False
    return True


def _pairs(dtype: torch.dtype, seed: int) -> tuple[list, list[float]]:
    """Gradients as a check meets them: exact, rounded, wrong, all zero, cancelling to ~0,
    non-finite, empty, one entry, of several sizes and ranks."""
    g = torch.Generator().manual_seed(seed)
    pairs, noises = [], []
    shapes = [(32, 64), (64,), (1, 64), (27, 10), (1,), (), (0, 3), (5, 7, 3), (2048,)]
    for i, shape in enumerate(shapes * 3):
        r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        kind = i % 9
        if kind == 0:
            m = r.clone()
        elif kind == 1:
            m = r + 1e-6 * torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        elif kind == 2:
            m = 2 * r
        elif kind == 3:
            r, m = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        elif kind == 4:  # a bias before a batchnorm: ~0 on both sides
            r = r * 1e-9
            m = r + 1e-12 * torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        elif kind == 5 and r.numel():
            m = r.clone()
            m.view(-1)[0] = float("nan")
        elif kind == 6 and r.numel():
            m, r = r.clone(), r.clone()
            m.view(-1)[-1] = float("inf")
            r.view(-1)[-1] = float("inf")  # inf - inf is NaN: fails
        elif kind == 7 and r.numel():
            r = r.clone()
            r.view(-1)[0] = float("-inf")
            m = r.clone()
        else:
            m = r * (1 + 1e-4)  # at the tolerance's edge
        pairs.append((m, r))
        noises.append([0.0, 1e-7, 1e-3, float("nan"), 0.5][i % 5])
    return pairs, noises


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compare_many_is_compare_gradient_by_gradient(dtype, seed):
    pairs, noises = _pairs(dtype, seed)
    many = compare_many(pairs, noises)
    one = [compare(m, r, rounding_noise=n) for (m, r), n in zip(pairs, noises)]
    assert len(many) == len(one)
    for i, (a, b) in enumerate(zip(many, one)):
        assert _same(a, b), (i, a, b)
    # the cases cover both verdicts
    assert {r["allclose"] for r in many} == {True, False}


def test_compare_many_takes_mixed_dtypes_and_shapes_one_by_one():
    """Pairs that are not one dtype and shape each (a manual still float32 beside a float64
    reference, a (12,) manual for a (4, 3) reference) are compare's own business."""
    r32, r64 = torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64)
    pairs = [(r32.clone(), r32), (r64 * 1.5, r64), (r32.double(), r64), (r32.reshape(-1), r32)]
    many = compare_many(pairs, [0.0] * 4)
    for (m, r), got in zip(pairs, many):
        assert _same(got, compare(m, r))


@pytest.mark.parametrize("seed", [0, 1])
def test_noise_many_is_noise_between(seed):
    g = torch.Generator().manual_seed(seed)
    quads = []
    for shape in [(32, 64), (64,), (1,), (5, 7, 3), (3, 3)]:
        m64 = torch.randn(shape, generator=g, dtype=torch.float64)
        a64 = torch.randn(shape, generator=g, dtype=torch.float64)
        quads.append(((m64.float(), m64), (a64.float(), a64)))
    nan = torch.full((2, 2), float("nan"), dtype=torch.float64)
    quads.append(((nan.float(), nan), (nan.float(), nan)))
    quads.append(((torch.zeros(3), torch.zeros(3, dtype=torch.float64)),) * 2)
    quads.append(((torch.ones(1, 4), torch.ones(4, dtype=torch.float64)),) * 2)  # (broadcast)
    got = noise_many(quads)
    for quad, noise in zip(quads, got):
        want = noise_between(quad)
        assert (math.isnan(noise) and math.isnan(want)) or noise == want, (noise, want)
    assert any(n > 0 for n in got)


def test_a_checks_passes_share_each_tensors_entries_and_give_the_same_numbers():
    """One Flats serves every pass of a check (comparison, rounding noise, the float64 rerun's
    comparison): each tensor is laid out once, and each pass answers as without it."""
    g = torch.Generator().manual_seed(3)
    quads, pairs32, pairs64 = [], [], []
    for shape in [(32, 64), (64,), (5, 7, 3)]:
        m64 = torch.randn(shape, generator=g, dtype=torch.float64)
        a64 = m64 + 1e-9 * torch.randn(shape, generator=g, dtype=torch.float64)
        m32, a32 = m64.float(), a64.float()
        quads.append(((m32, m64), (a32, a64)))
        pairs32.append((m32, a32))
        pairs64.append((m64, a64))
    flats = Flats()
    noises = noise_many(quads, flats)
    shared = [*compare_many(pairs32, noises, flats), *compare_many(pairs64, noises, flats)]
    alone = [*compare_many(pairs32, noises), *compare_many(pairs64, noises)]
    assert noises == noise_many(quads)
    assert all(_same(a, b) for a, b in zip(shared, alone)) and len(shared) == 6
    assert len(flats._made) == 12  # four tensors a gradient, each laid out once
    first = flats(pairs32[0][0])
    compare_many(pairs32, noises, flats)
    assert len(flats._made) == 12 and flats(pairs32[0][0]) is first  # asked again: kept


def test_noise_between_large_gradients_is_the_whole_float64_difference(monkeypatch):
    """Cast and compared a pass at a time (no float64 copies of whole gradients): the same
    as the whole cast's max|a - b|, NaN kept."""
    from app.check import tolerance

    monkeypatch.setattr(tolerance, "COMPARE_CHUNK", 1000)
    a = torch.randn(300, 97)
    b = a + torch.randn(300, 97) * 1e-6
    wide = a.double(), (a.double() * (1 + 1e-7)).float().double()
    pairs = [(a, b), (wide[0], wide[1].float())]
    want = sum((x.double() - y.double()).abs().max().item() for x, y in pairs)
    assert noise_between(pairs) == want
    a[299, 96] = float("nan")
    assert math.isnan(noise_between([(a, b)]))


def test_sides_of_different_shapes_are_compared_whole_as_torch_broadcasts_them():
    """Never cut into passes of different lengths: broadcast as torch does, or its error."""
    from app.check.tolerance import max_abs_diff

    a, b = torch.randn(3, 4), torch.randn(4)
    assert noise_between([(a, b)]) == (a.double() - b.double()).abs().max().item()
    with pytest.raises(RuntimeError):
        max_abs_diff(torch.randn(3, 4), torch.randn(5))
