"""Activations: elementwise, so their backward is a mask or a derivative times the gradient."""

from __future__ import annotations

from app.ops.base import Op
from app.ops.functional import where
from app.ops.traced import Traced

LEAKY_SLOPE = 0.01


class ReLU(Op):
    """a = relu(l): (*B, h) -> (*B, h); the gradient passes where l > 0 (0 at l == 0)."""

    kind = "relu"

    def forward(self, l: Traced) -> Traced:  # noqa: E741
        return l.clamp_min(0.0)

    def backward(self, g: Traced, l: Traced, *, result: Traced):  # noqa: E741
        return {l.expr: lambda: (l > 0).float() * g}  # a 0/1 mask times the gradient


class LeakyReLU(Op):
    """a = leaky_relu(l, 0.01): (*B, h) -> (*B, h); slope 1 where l > 0, else 0.01."""

    kind = "leaky_relu"

    def forward(self, l: Traced) -> Traced:  # noqa: E741
        return where(l > 0, l, LEAKY_SLOPE * l)

    def backward(self, g: Traced, l: Traced, *, result: Traced):  # noqa: E741
        return {l.expr: lambda: where(l > 0, g, LEAKY_SLOPE * g)}


class Tanh(Op):
    """a = tanh(l): (*B, h) -> (*B, h); d tanh = 1 - tanh^2, from the saved output."""

    kind = "tanh"

    def forward(self, l: Traced) -> Traced:  # noqa: E741
        return l.tanh()

    def backward(self, g: Traced, l: Traced, *, result: Traced):  # noqa: E741
        return {l.expr: lambda: (1 - result.pow(2)) * g}


class Sigmoid(Op):
    """a = sigmoid(l): (*B, h) -> (*B, h); d sigmoid = s * (1 - s), from the saved output."""

    kind = "sigmoid"

    def forward(self, l: Traced) -> Traced:  # noqa: E741
        return l.sigmoid()

    def backward(self, g: Traced, l: Traced, *, result: Traced):  # noqa: E741
        return {l.expr: lambda: result * (1 - result) * g}
