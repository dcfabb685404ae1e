"""A thread's reused product buffer (app/ops/scratch.py): written over only when nothing else
holds it, the same numbers as fresh products, one buffer per thread for a whole backward."""

from __future__ import annotations

import threading

import pytest
import torch

from app.ops import Context, scratch, spare
from app.ops.linear import Linear
from app.ops.traced import Traced


def product(a: torch.Tensor, b: torch.Tensor) -> Traced:
    return Traced.leaf(a, "a").unsqueeze(1) * Traced.leaf(b, "b")  # (n, 1, k) * (m, k)


def test_a_lent_scratch_takes_each_product_while_no_earlier_one_is_alive():
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    buffer = scratch.Scratch()
    with buffer.lent():
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
        kept = product(a, b).t[1:2].reshape(5, 4)  # the product itself is gone, a view stays
        again = product(a * 2, b).t
        assert not torch.equal(again, a.unsqueeze(1) * b)  # (sanity: different numbers)
        assert torch.equal(kept, (a.unsqueeze(1) * b)[1:2].reshape(5, 4)), "written over"


def test_only_broadcast_products_in_a_lent_block_use_the_buffer():
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    buffer = scratch.Scratch()
    with buffer.lent():
        address = product(a, b).t.data_ptr()
        same_shape = (Traced.leaf(a, "a") * Traced.leaf(a, "a")).t  # not a broadcast
        added = (Traced.leaf(a, "a").unsqueeze(1) + Traced.leaf(b, "b")).t  # not a product
        assert same_shape.data_ptr() != address and added.data_ptr() != address
    outside = product(a, b).t  # not lent here
    assert outside.data_ptr() != address


def test_dtypes_and_sizes_follow_the_product():
    buffer = scratch.Scratch()
    with buffer.lent():
        small = product(torch.randn(2, 3), torch.randn(4, 3)).t
        assert small.shape == (2, 4, 3) and small.dtype == torch.float32
        del small
        wide = product(torch.randn(6, 3, dtype=torch.float64), torch.randn(4, 3)).t
        assert wide.dtype == torch.float64 and wide.shape == (6, 4, 3)
        mask = Traced.leaf(torch.rand(6, 1) > 0.5, "m") * Traced.leaf(torch.randn(4), "b")
        assert mask.t.dtype == torch.float32 and mask.t.shape == (6, 4)
        del mask
        # a 0-dim float64 operand does not widen a float32 tensor: torch's own promotion
        zero_dim = torch.tensor(2.0, dtype=torch.float64)
        scaled = (Traced.leaf(torch.randn(6, 4), "a") * Traced.leaf(zero_dim, "s")).t
        assert scaled.dtype == torch.float32


def test_shapes_that_cannot_broadcast_keep_torchs_own_error():
    buffer = scratch.Scratch()
    with buffer.lent(), pytest.raises(RuntimeError, match="must match"):
        product(torch.randn(3, 4), torch.randn(5, 3))


@pytest.fixture
def with_spare():
    helper = spare.Spare("test-scratch-spare")
    spare.attach(helper)
    yield helper
    spare.attach(None)


@pytest.mark.parametrize("use_spare", [False, True])
def test_a_chunked_backward_makes_its_products_in_one_buffer_per_thread(
    monkeypatch, request, use_spare
):
    """The article's first layer at 2 MiB chunks: dozens of products, one buffer a thread,
    and the same gradients bit for bit as fresh products."""
    if use_spare:
        request.getfixturevalue("with_spare")
    made: dict[int, set[int]] = {}
    real_out = scratch.Scratch.out

    def out(self, shape, dtype):
        t = real_out(self, shape, dtype)
        if t is not None:
            made.setdefault(threading.get_ident(), set()).add(t.untyped_storage().data_ptr())
        return t

    g, x = torch.randn(300, 50), torch.randn(300, 784)
    w, b = torch.randn(784, 50) * 0.05, torch.randn(50)
    op = Linear(("x", "w1", "b1"), "out")
    ctx = Context(strategy="broadcast", chunk_bytes=4 << 20)
    result = op.compute_forward((x, w, b))
    monkeypatch.setattr(scratch, "_storage_use_count", None)  # nothing reused: fresh products
    fresh = op.compute_backward(g, (x, w, b), result, ctx)
    monkeypatch.setattr(scratch, "_storage_use_count", torch._C._storage_Use_Count)
    monkeypatch.setattr(scratch.Scratch, "out", out)
    reused = op.compute_backward(g, (x, w, b), result, ctx)
    assert made, "no product went to a scratch buffer"
    assert all(len(buffers) == 1 for buffers in made.values()), made
    assert len(made) == (2 if use_spare else 1)
    for name in fresh:
        assert torch.equal(fresh[name], reused[name]), name
