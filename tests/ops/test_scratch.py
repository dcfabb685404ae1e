"""A thread's reused product buffer (app/ops/scratch.py): written over only when nothing else
holds it, the same numbers as fresh products, one buffer per thread for a whole backward."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from app.ops import Context, scratch
from app.ops.linear import Linear
from app.ops.traced import Traced


def product(a: torch.Tensor, b: torch.Tensor) -> Traced:
    return Traced.leaf(a, "a").unsqueeze(1) * Traced.leaf(b, "b")  # (n, 1, k) * (m, k)


@pytest.fixture(autouse=True)
def no_layout_learnt(monkeypatch):
    """Each test learns its products' layouts itself (the first of a kind is made fresh)."""
    monkeypatch.setattr(scratch, "_LAYOUTS", {})


def on_buffer(buffer: scratch.Scratch, t: torch.Tensor) -> bool:
    return t.untyped_storage().data_ptr() == buffer._buffer.untyped_storage().data_ptr()


def test_a_lent_scratch_takes_each_product_while_no_earlier_one_is_alive():
    """The first product of its operands' shapes, strides and dtypes is made fresh (torch's
    own layout, learnt), the next ones on the buffer while no earlier one is alive."""
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    buffer = scratch.Scratch()
    with buffer.lent():
        product(a, b)  # (learns the layout)
        first = product(a, b).t
        second = product(a, b).t  # `first` still alive: a tensor of its own
        address, other = first.data_ptr(), second.data_ptr()  # (ints: an assert on the
        del first, second  # tensors would keep them alive)
        assert address != other
        third = product(a, b).t  # nothing holds the buffer now: written over
        assert third.data_ptr() == address
        assert torch.equal(third, a.unsqueeze(1) * b)


def test_a_view_of_a_product_keeps_the_buffer_from_being_written_over():
    """Not the product tensor alone: any view of its storage (a share returned as a view,
    a slice kept) holds the buffer."""
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    buffer = scratch.Scratch()
    with buffer.lent():
        product(a, b)  # (learns the layout)
        kept = product(a, b).t[1:2].reshape(5, 4)  # the product itself is gone, a view stays
        assert on_buffer(buffer, kept)
        again = product(a * 2, b).t
        assert not torch.equal(again, a.unsqueeze(1) * b)  # (sanity: different numbers)
        assert torch.equal(kept, (a.unsqueeze(1) * b)[1:2].reshape(5, 4)), "written over"


def test_only_broadcast_products_in_a_lent_block_use_the_buffer():
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    buffer = scratch.Scratch()
    with buffer.lent():
        product(a, b)  # (learns the layout)
        address = product(a, b).t.data_ptr()
        assert address == buffer._buffer.data_ptr()
        same_shape = (Traced.leaf(a, "a") * Traced.leaf(a, "a")).t  # not a broadcast
        added = (Traced.leaf(a, "a").unsqueeze(1) + Traced.leaf(b, "b")).t  # not a product
        assert same_shape.data_ptr() != address and added.data_ptr() != address
    outside = product(a, b).t  # not lent here
    assert outside.data_ptr() != address


def test_dtypes_and_sizes_follow_the_product():
    """Each product made twice: the second on the buffer, as torch would make it fresh."""
    buffer = scratch.Scratch()

    def twice(make) -> torch.Tensor:
        make()
        made = make().t
        assert on_buffer(buffer, made)
        return made

    zero_dim = torch.tensor(2.0, dtype=torch.float64)
    a, b, c = torch.randn(2, 3), torch.randn(4, 3), torch.randn(6, 3, dtype=torch.float64)
    mask, row = torch.rand(6, 1) > 0.5, torch.randn(4)
    with buffer.lent():
        small = twice(lambda: product(a, b))
        assert small.shape == (2, 4, 3) and small.dtype == torch.float32
        del small
        wide = twice(lambda: product(c, b))
        assert wide.dtype == torch.float64 and wide.shape == (6, 4, 3)
        del wide
        masked = twice(lambda: Traced.leaf(mask, "m") * Traced.leaf(row, "b"))
        assert masked.dtype == torch.float32 and masked.shape == (6, 4)
        del masked
        # a 0-dim float64 operand does not widen a float32 tensor: torch's own promotion
        scaled = twice(lambda: Traced.leaf(torch.randn(6, 4), "a") * Traced.leaf(zero_dim, "s"))
        assert scaled.dtype == torch.float32


def test_shapes_that_cannot_broadcast_keep_torchs_own_error():
    buffer = scratch.Scratch()
    with buffer.lent(), pytest.raises(RuntimeError, match="must match"):
        product(torch.randn(3, 4), torch.randn(5, 3))


@pytest.mark.parametrize("use_spare", [False, True])
def test_a_chunked_backward_makes_every_product_in_one_buffer_per_thread(
    monkeypatch, request, use_spare
):
    """The article's first layer at 2 MiB chunks (the last chunk shorter): every one of its
    products written into its thread's one buffer, none allocated beside it, and the same
    gradients bit for bit as fresh products."""
    if use_spare:
        request.getfixturevalue("with_spare")
    buffers: dict[int, set[int]] = {}
    fresh_ones = []
    real_multiply = scratch.Scratch.multiply

    def multiply(self, a, b):
        t = real_multiply(self, a, b)
        if self._buffer is not None and on_buffer(self, t):
            buffers.setdefault(threading.get_ident(), set()).add(t.untyped_storage().data_ptr())
        else:
            fresh_ones.append((tuple(a.shape), tuple(b.shape)))
        return t

    g, x = torch.randn(301, 50), torch.randn(301, 784)
    w, b = torch.randn(784, 50) * 0.05, torch.randn(50)
    op = Linear(("x", "w1", "b1"), "out")
    ctx = Context(strategy="broadcast", chunk_bytes=4 << 20)
    result = op.compute_forward((x, w, b))
    monkeypatch.setattr(scratch, "_storage_use_count", None)  # nothing reused: fresh products
    fresh = op.compute_backward(g, (x, w, b), result, ctx)
    monkeypatch.setattr(scratch, "_storage_use_count", torch._C._storage_Use_Count)
    op.compute_backward(g, (x, w, b), result, ctx)  # the layouts learnt (one product a kind)
    monkeypatch.setattr(scratch.Scratch, "multiply", multiply)
    reused = op.compute_backward(g, (x, w, b), result, ctx)
    assert not fresh_ones, f"{len(fresh_ones)} products allocated beside the buffer"
    assert all(len(addresses) == 1 for addresses in buffers.values()), buffers
    assert len(buffers) == (2 if use_spare else 1)
    for name in fresh:
        assert torch.equal(fresh[name], reused[name]), name


def test_a_product_of_transposed_operands_keeps_the_layout_a_fresh_one_has():
    """Written with `out=` into a contiguous tensor, a product of transposed operands would
    be summed in another order than a fresh one (up to 1e-5 apart): the buffer takes the
    fresh product's own strides, so the sums are the same bit for bit."""
    g, w_t = torch.randn(26, 50), torch.randn(50, 784).T  # w as its transpose: (784, 50)
    x_t = torch.randn(784, 26).T  # (26, 784)
    fresh_x = (g.unsqueeze(1) * w_t).sum(-1)
    fresh_w = (x_t.unsqueeze(-1) * g.unsqueeze(1)).sum(0)
    buffer = scratch.Scratch()
    with buffer.lent():
        Traced.leaf(g, "g").unsqueeze(1) * Traced.leaf(w_t, "w")  # (the layouts learnt)
        Traced.leaf(x_t, "x").unsqueeze(-1) * Traced.leaf(g, "g").unsqueeze(1)
        product = Traced.leaf(g, "g").unsqueeze(1) * Traced.leaf(w_t, "w")
        assert on_buffer(buffer, product.t)
        assert product.t.stride() == (g.unsqueeze(1) * w_t).stride()
        address = product.t.untyped_storage().data_ptr()
        x_g = product.sum(-1).t
        del product
        product = Traced.leaf(x_t, "x").unsqueeze(-1) * Traced.leaf(g, "g").unsqueeze(1)
        assert product.t.untyped_storage().data_ptr() == address  # (the same buffer)
        w_g = product.sum(0).t
    assert torch.equal(x_g, fresh_x) and torch.equal(w_g, fresh_w)


def test_contiguous_operands_go_to_the_buffer_from_the_first_product_as_torch_lays_them():
    """torch lays out the product of contiguous operands contiguously, whatever broadcasts:
    so such a product goes to the buffer at once, with nothing learnt. Checked against a
    fresh product over random broadcasting shapes (a torch that changed this would fail
    here, not give other numbers)."""
    rng = random.Random(0)
    for _ in range(300):
        dims = [rng.choice([1, 2, 3, 5]) for _ in range(rng.randint(1, 4))]

        def operand(dims: list[int] = dims) -> torch.Tensor:
            shape = dims[len(dims) - rng.randint(0, len(dims)) :]
            return torch.randn([d if rng.random() < 0.6 else 1 for d in shape])

        a, b = operand(), operand()
        if a.shape == b.shape:
            continue
        fresh = Traced.leaf(a, "a") * Traced.leaf(b, "b")  # (not lent: made fresh)
        buffer = scratch.Scratch()
        with buffer.lent():
            made = (Traced.leaf(a, "a") * Traced.leaf(b, "b")).t
        assert on_buffer(buffer, made), (a.shape, b.shape)
        assert made.shape == fresh.t.shape and made.stride() == fresh.t.stride()
        assert torch.equal(made, fresh.t)
