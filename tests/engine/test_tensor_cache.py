"""The last run's x, kept by seed and shape (app/engine/tensors.py): the same numbers as a fresh
draw, never the same storage, and the draws after it unchanged."""

from __future__ import annotations

import torch

from app.engine import tensors
from app.schemas import RunRequest


def test_a_kept_x_is_a_copy_of_exactly_what_a_fresh_draw_gives():
    tensors._LAST_X = None
    fresh = tensors.make_tensors(RunRequest(batch=64, seed=3))
    kept = tensors.make_tensors(RunRequest(batch=64, seed=3))
    assert tensors._LAST_X is not None  # the second call took the kept x
    for name in fresh:  # x and every draw after it (the generator moved on as if it drew x)
        assert torch.equal(fresh[name], kept[name]), name
    assert kept["x"].data_ptr() != fresh["x"].data_ptr()
    kept["x"].add_(1.0)  # a run that wrote into its x would not reach the next run's
    again = tensors.make_tensors(RunRequest(batch=64, seed=3))
    assert torch.equal(again["x"], fresh["x"])


def test_another_seed_or_shape_draws_afresh():
    a = tensors.make_tensors(RunRequest(batch=64, seed=3))
    assert not torch.equal(tensors.make_tensors(RunRequest(batch=64, seed=4))["x"], a["x"])
    b = tensors.make_tensors(RunRequest(batch=32, seed=3))
    g = torch.Generator().manual_seed(3)
    assert torch.equal(b["x"], torch.randn(32, 784, generator=g))
