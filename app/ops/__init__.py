"""Ops: each a class with its forward, manual backward and trace; importing registers them."""

from app.ops import activations, linear, losses, norms  # noqa: F401  (registers every op)
from app.ops.base import Context, Op
from app.ops.broadcast import broadcast_rule
from app.ops.functional import unbroadcast
from app.ops.traced import Traced

__all__ = ["Context", "Op", "Traced", "broadcast_rule", "unbroadcast"]
