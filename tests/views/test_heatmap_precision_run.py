"""/api/run's extra maps (autograd's, the difference's, the tolerance's) at 5 significant
digits, the gradient's own map exact (API.md: max_cells >= size returns the tensor exactly)."""

from __future__ import annotations

import numpy as np
import torch

from app.runs import pipeline
from app.schemas import RunRequest


def test_the_gradient_map_is_exact_and_the_extra_maps_are_rounded():
    cfg = RunRequest(batch=8, in_features=6, hidden=[5], reference_heatmaps=True)
    out = pipeline.run(cfg, 1 << 20)
    view = out["gradients"]["w1"]
    exact = pipeline.run(cfg.model_copy(update={"reference_heatmaps": False}), 1 << 20)
    assert np.array_equal(view["heatmap"]["z"], exact["gradients"]["w1"]["heatmap"]["z"])
    reference = view["reference_heatmap"]["z"].astype(np.float64)
    nonzero = reference[reference != 0]
    digits = np.floor(np.log10(np.abs(nonzero)))
    scaled = nonzero / 10.0 ** (digits - 4)  # 5 significant digits: an integer up to float32
    assert np.allclose(scaled, np.round(scaled), atol=1e-2)
    # within 5e-5 relative of autograd's own map, the same blocks
    z = torch.tensor(view["heatmap"]["z"], dtype=torch.float64)
    assert np.allclose(reference.reshape(z.shape), z.numpy(), rtol=1e-4, atol=1e-6)
