"""The bug gallery: classic mistakes in the article's backward formulas (GET /api/bugs).

Each entry is one formula for one gradient of the article's default network (x (1000, 784)
-> 50 -> relu -> 1 -> mse). Its `kind` says what Broadprop does with it, and
tests/lab/test_bugs.py holds every entry to that:
- "shape": refused before anything runs, with the shapes that clash;
- "value": runs, and the check against autograd fails;
- "silent": runs and fails the check, yet passes the article's own `is_same`, which has no
  `abs()`: `(a - b).max() < tol` is true for any gradient that is too small everywhere. It
  must pass on every tensor the article compares (w1, w2, b2) and on its own gradient: an
  error too small in one gradient can have both signs downstream (relu-only-negative).

The article's own three slips are here as what they let through: `is_same` without `abs()`
(the "silent" entries), `b1` never compared (`b2` compared twice), and `back_mse`'s result
never stored in `out.g`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

ARTICLE_TOLERANCE = 1e-3


def article_is_same(a: torch.Tensor, b: torch.Tensor, tol: float = ARTICLE_TOLERANCE) -> bool:
    """The article's check, slip included: no abs(), so a negative error always passes."""
    return bool((a - b).max() < tol)


@dataclass(frozen=True)
class Bug:
    id: str
    title: str
    grad: str  # "x.g"
    formula: str
    kind: str  # shape, value, silent
    lesson: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


BUGS: tuple[Bug, ...] = (
    Bug(
        "x-no-unsqueeze",
        "Forgot the unsqueeze",
        "x.g",
        "(l1.g * w1).sum(-1)",
        "shape",
        "l1.g (1000, 50) and w1 (784, 50) only broadcast once l1.g gets its own dim: "
        "l1.g.unsqueeze(1) pairs every row with every row of w1.",
    ),
    Bug(
        "x-no-sum",
        "Forgot the sum",
        "x.g",
        "l1.g.unsqueeze(1) * w1",
        "shape",
        "The broadcast product is (1000, 784, 50); the chain rule sums over the 50 outputs: "
        ".sum(-1) gives x's (1000, 784).",
    ),
    Bug(
        "x-matmul-no-transpose",
        "Matmul without the transpose",
        "x.g",
        "l1.g @ w1",
        "shape",
        "(1000, 50) @ (784, 50) has inner dims 50 vs 784: the matrix form of x.g is l1.g @ w1.T.",
    ),
    Bug(
        "w-outer-product-missing",
        "Rows of x times rows of l1.g",
        "w1.g",
        "(x * l1.g).sum(0)",
        "shape",
        "w1.g pairs every input column with every output column, per row: "
        "x.unsqueeze(-1) * l1.g.unsqueeze(1) is (1000, 784, 50), then sum over the rows.",
    ),
    Bug(
        "b-no-batch-sum",
        "The bias forgot its batch",
        "b1.g",
        "l1.g",
        "shape",
        "b1 (50,) was broadcast over the 1000 rows in the forward pass, so its gradient sums "
        "over them: l1.g.sum(0).",
    ),
    Bug(
        "mse-n-by-n",
        "(N, 1) minus (N,) is (N, N)",
        "out.g",
        "2 * (out - target) / out.shape[0]",
        "shape",
        "out (1000, 1) minus target (1000,) broadcasts to (1000, 1000) without a word: the "
        "article squeezes out first and unsqueezes the result back.",
    ),
    Bug(
        "relu-no-mask",
        "ReLU's gradient without its mask",
        "l1.g",
        "a1.g",
        "value",
        "relu passes the gradient only where l1 > 0: (l1 > 0).float() * a1.g. Without the "
        "mask, every dead unit still learns.",
    ),
    Bug(
        "mse-forgot-2",
        "The 2 of the square",
        "out.g",
        "(out.squeeze(-1) - target).unsqueeze(-1) / out.shape[0]",
        "value",
        "d/dx x^2 = 2x: without the 2, every gradient of the network is half what it should "
        "be, and the check says so on all of them.",
    ),
    Bug(
        "w-mean-not-sum",
        "Mean over the batch instead of sum",
        "w1.g",
        "(x.unsqueeze(-1) * l1.g.unsqueeze(1)).mean(0)",
        "value",
        "The 1/N of the mean is already in out.g: w1.g sums the rows' contributions. A mean "
        "divides by N a second time.",
    ),
    Bug(
        "article-b1-never-compared",
        "The article's slip: b1 never compared",
        "b1.g",
        "l1.g.mean(0)",
        "value",
        "The article compares b2 twice and b1 never, so this wrong b1.g passes every check it "
        "makes. Broadprop compares every gradient: b1's row fails.",
    ),
    Bug(
        "article-out-g-never-stored",
        "The article's slip: back_mse's result never stored",
        "out.g",
        "torch.zeros_like(out)",
        "value",
        "back_mse computes the gradient and drops it, so out.g stays 0 and so does every "
        "gradient before it. An absolute-only tolerance would call those zeros close to small "
        "true gradients; a tolerance scaled to max|autograd| does not.",
    ),
    Bug(
        "article-is-same-no-abs",
        "The article's slip: is_same without abs()",
        "b1.g",
        "l1.g.sum(0) - 1",
        "silent",
        "(a - b).max() < tol is true for a gradient that is 1 too small everywhere: without "
        "abs() a negative error always passes. Broadprop compares |manual - autograd|.",
    ),
    Bug(
        "x-abs-in-the-wrong-place",
        "abs() in the wrong place",
        "x.g",
        "-(l1.g.unsqueeze(1) * w1).sum(-1).abs()",
        "silent",
        "-|g| is never above g, so (manual - autograd).max() < tol passes it, yet every "
        "positive entry has the wrong sign.",
    ),
    Bug(
        "relu-only-negative",
        "Only the negative half of the gradient",
        "l1.g",
        "(l1 > 0).float() * a1.g.clamp_max(0)",
        "value",
        "Dropping every positive entry makes l1.g smaller, yet not w1.g: w1.g = x.T @ l1.g "
        "weighs it by x, whose entries have both signs, so w1.g's error has both too and even "
        "the article's is_same (no abs) catches it on w1. Too small stays too small only "
        "where nothing downstream mixes signs.",
    ),
    Bug(
        "b2-mean-not-sum",
        "The output bias: mean instead of sum",
        "b2.g",
        "out.g.mean(0)",
        "silent",
        "b2.g is one number, the sum of out.g over the rows, positive on the article's run: "
        "the mean divides it by 1000, so it is too small and is_same (no abs) passes it, "
        "though the article compares b2 twice. The same slip on w1.g is caught: its entries "
        "have both signs.",
    ),
)


def gallery() -> list[dict[str, str]]:
    return [bug.as_dict() for bug in BUGS]
