"""The linear layer, with the article's broadcasting backward and two faster strategies."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from app.ops import scratch, spare
from app.ops.base import Context, Op, Trail, sum_formula
from app.ops.functional import unbroadcast
from app.ops.traced import Traced


class Linear(Op):
    """out = x @ w + b: (*B, in) @ (in, out) + (out,) -> (*B, out)."""

    kind = "linear"

    def forward(self, x: Traced, w: Traced, b: Traced) -> Traced:
        return x @ w + b  # (*B, in) @ (in, out) -> (*B, out); + (out,) broadcasts over *B

    def backward(self, g: Traced, x: Traced, w: Traced, b: Traced, *, result: Traced):
        k = g.ndim - 1  # where the in-dim goes: (*B, out) -> (*B, 1, out)
        return {
            # (*B, 1, out) * (in, out) -> (*B, in, out), summed over out -> (*B, in)
            x.expr: lambda: (g.unsqueeze(k) * w).sum(-1),
            # (*B, in, 1) * (*B, 1, out) -> (*B, in, out), summed over *B -> (in, out)
            w.expr: lambda: unbroadcast(x.unsqueeze(-1) * g.unsqueeze(k), w.shape),
            # b was broadcast over *B in the forward pass: (*B, out) -> (out,)
            b.expr: lambda: unbroadcast(g, b.shape),
        }

    followed = frozenset({0, 1, 2})

    def follow(
        self, name: str, index: tuple[int, ...], g: torch.Tensor, xs: Sequence[torch.Tensor]
    ) -> Trail:
        """One element of a gradient as the terms `backward`'s reduction sums: x.g[*n, i] is
        out's 50 products g[*n, o] * w[i, o]; w.g[i, o] and b.g[o] sum over every position
        n of *B. Only those terms are read: never the (*B, in, out) product."""
        x, w, _ = xs
        x_name, w_name, _ = self.inputs
        g_name = f"{self.output}.g"
        lead = tuple(x.shape[:-1])  # *B
        every = (None,) * len(lead)  # `:` over *B
        product = (*lead, *w.shape)  # (*B, in, out): the broadcast of the x.g and w.g formulas
        if name == x_name:  # (*B, 1, out) * (in, out), summed over out
            *n, i = index
            at = {g_name: (*n, None), w_name: (i, None)}
            factors = {g_name: g[tuple(n)], w_name: w[i]}  # (out,), (out,)
            return Trail(sum_formula(name, index, at), product, (*index, None), factors, at)
        if name == w_name:  # (*B, in, 1) * (*B, 1, out), summed over *B
            i, o = index
            at = {x_name: (*every, i), g_name: (*every, o)}
            factors = {x_name: x[..., i].reshape(-1), g_name: g[..., o].reshape(-1)}  # (N,), (N,)
            return Trail(sum_formula(name, index, at), product, (*every, i, o), factors, at)
        (o,) = index  # b was broadcast over *B: its gradient sums g over *B
        at = {g_name: (*every, o)}
        factors = {g_name: g[..., o].reshape(-1)}  # (N,)
        return Trail(sum_formula(name, index, at), tuple(g.shape), (*every, o), factors, at)

    def compute_forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        x, w, b = xs
        return x @ w + b  # `forward` on plain tensors

    def compute_backward(
        self, g: torch.Tensor, xs: Sequence[torch.Tensor], result: torch.Tensor, ctx: Context
    ) -> dict[str, torch.Tensor]:
        x, w, b = xs
        x_name, w_name, b_name = self.inputs
        x2 = x.reshape(-1, x.shape[-1])  # (N, in): the leading dims flattened, no copy
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        want_x = x_name not in ctx.skip
        if ctx.strategy == "broadcast":
            out2 = result.reshape(-1, result.shape[-1])  # (N, out)
            x_g, w_g = self._broadcast_chunked(g2, x2, w, b, out2, ctx, want_x)
        elif ctx.strategy == "einsum":
            x_g = torch.einsum("no,io->ni", g2, w) if want_x else None  # (N, in)
            w_g = torch.einsum("ni,no->io", x2, g2)  # (in, out)
        elif ctx.strategy == "matmul":
            x_g = g2 @ w.T if want_x else None  # (N, out) @ (out, in) -> (N, in)
            w_g = x2.T @ g2  # (in, N) @ (N, out) -> (in, out)
        else:
            raise ValueError(f"unknown strategy {ctx.strategy!r}")
        b_g = g2.sum(0)  # (out,)
        grads = {w_name: w_g, b_name: b_g}
        if x_g is not None:
            grads[x_name] = x_g.reshape(x.shape)
        return grads

    def _broadcast_chunked(
        self,
        g2: torch.Tensor,
        x2: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor,
        out2: torch.Tensor,
        ctx: Context,
        want_x: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The article's formulas, literally, over row chunks whose (rows, in, out) product
        fits in `ctx.chunk_bytes`: the same numbers without the full (N, in, out)
        intermediate. The cancel token is checked before each chunk."""
        n, (fan_in, fan_out) = g2.shape[0], w.shape
        in_flight = CHUNKS_IN_FLIGHT if spare.available() else 1
        rows = chunk_rows(fan_in, fan_out, g2.element_size(), ctx.chunk_bytes, in_flight)
        x_g = torch.empty_like(x2) if want_x else None  # (N, in)
        # the chunks' partial sums add up in float64: one float32 sum over a million rows
        # would round far more than autograd's matmul does
        w_g = torch.zeros_like(w, dtype=torch.float64)  # (in, out)
        x_name, w_name, b_name = self.inputs
        w_t, b_t = Traced.leaf(w, w_name), Traced.leaf(b, b_name)
        products = scratch.PerThread()  # each thread's products in one reused buffer

        def chunk_share(start: int) -> torch.Tensor:
            chunk = slice(start, start + rows)
            formulas = self.backward(
                Traced.leaf(g2[chunk], f"{self.output}.g"),
                Traced.leaf(x2[chunk], x_name),
                w_t,
                b_t,
                result=Traced.leaf(out2[chunk], self.output),
            )
            with products.lent():
                if x_g is not None:
                    x_g[chunk] = formulas[x_name]().t  # (rows, in)
                return formulas[w_name]().t  # (in, out): this chunk's share of the sum over rows

        # chunks side by side on the lane's spare core, if any, when two fit in the cap (a
        # single row's product can be bigger than half of it); their shares added in order
        row_bytes = fan_in * fan_out * g2.element_size()
        side_by_side = in_flight > 1 and chunks_in_flight(n, rows, row_bytes, ctx.chunk_bytes) > 1
        hold = shares_held(fan_in, fan_out, g2.element_size())
        spare.in_order(range(0, n, rows), chunk_share, w_g.add_, ctx.check, side_by_side, hold)
        return x_g, w_g.to(w.dtype)


MAX_CHUNK_ROWS = 4096  # a chunk's own sum over rows stays short, so it rounds little


# A run with a spare thread (app/ops/spare.py; a small lane's run) may hold two chunks' products
# at once, its own and its spare's: each chunk then gets half the cap, so what is in flight
# stays within `chunk_bytes`. A run without one (a large lane's, a worker's) keeps whole-cap
# chunks: more, smaller parallel regions cost its torch threads a wake-up each. A config always
# runs in the same lane, so it is always cut into the same chunks: the same answer, bit for bit.
CHUNKS_IN_FLIGHT = 2


# With a spare, each thread may hold a few chunks' (in, out) shares made and not yet added (in
# the chunks' order), so that the faster thread takes more chunks when the other's core is
# shared with another process (spare.in_order): the article's 784 x 50 shares (157 KB), three
# a thread; a share of over HELD_SHARES_BYTES is held alone, as before (the two threads then
# go in lockstep). Three were as fast as six beside a spinning process, and the server's peak
# extra memory for the article's run stayed where it was (six: 5 MB more).
HELD_SHARES_BYTES = 1 << 19


def shares_held(fan_in: int, fan_out: int, itemsize: int) -> int:
    """How many (in, out) shares a thread may hold at once (at least the one it made)."""
    return max(1, HELD_SHARES_BYTES // (fan_in * fan_out * itemsize))


def chunks_in_flight(n_rows: int, rows: int, row_bytes: int, chunk_bytes: int) -> int:
    """How many chunks of `rows` may be computed at once: two (the run's and its spare's)
    when there are two and both fit in the cap, else one."""
    return (
        CHUNKS_IN_FLIGHT
        if n_rows > rows and CHUNKS_IN_FLIGHT * rows * row_bytes <= chunk_bytes
        else 1
    )


def chunk_rows(
    fan_in: int, fan_out: int, itemsize: int, chunk_bytes: int, in_flight: int = 1
) -> int:
    """Rows per chunk: as many (in, out) product rows as fit in `chunk_bytes` shared by the
    `in_flight` chunks, at least one and at most MAX_CHUNK_ROWS."""
    share = chunk_bytes // in_flight
    return min(MAX_CHUNK_ROWS, max(1, share // (fan_in * fan_out * itemsize)))
