"""The dry runs' meta kernels (app/ops/meta_kernels.py): C++ where torch has them, the same
shapes and dtypes as the real run, and none of torch.compile's machinery loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from app.ops import meta_kernels


def _calls(device: str) -> dict:
    """One call for each op of COMPOSITE_ON_META, and some that keep their Python meta."""
    x = torch.arange(24.0, device=device).reshape(4, 6) - 11.5  # (4, 6)
    rows = torch.tensor([0, 2, 1], device=device)
    mask = x > 0
    table = torch.ones(10, 6, device=device)
    images = torch.ones(2, 3, 6, 6, device=device)
    return {
        "aten::_unsafe_index_put": lambda: torch.ops.aten._unsafe_index_put(
            x, (rows,), torch.zeros(3, 6, device=device), True
        ),
        "aten::_unsafe_view": lambda: torch.ops.aten._unsafe_view(x, [24]),
        "aten::arange": lambda: torch.arange(7, device=device),
        "aten::arange.start_step": lambda: torch.arange(1, 9, 2, device=device),
        "aten::empty_like": lambda: torch.empty_like(x),
        "aten::eye": lambda: torch.eye(3, device=device),
        "aten::full": lambda: torch.full((3, 2), 1.5, device=device),
        "aten::index_put": lambda: x.index_put((rows,), torch.zeros(3, 6, device=device)),
        "aten::index_put_": lambda: x.clone().index_put_(
            (rows,), torch.zeros(3, 6, device=device), accumulate=True
        ),
        "aten::masked_fill.Scalar": lambda: x.masked_fill(mask, 0.0),
        "aten::mean": lambda: x.mean(),
        "aten::new_empty": lambda: x.new_empty(5),
        "aten::new_empty_strided": lambda: x.new_empty_strided((2, 3), (3, 1)),
        "aten::new_zeros": lambda: x.new_zeros(3, 3),
        "aten::ones_like": lambda: torch.ones_like(x),
        "aten::scalar_tensor": lambda: torch.scalar_tensor(2.0, device=device),
        "aten::select_backward": lambda: torch.ops.aten.select_backward(x[0], [4, 6], 0, 1),
        "aten::select_scatter": lambda: torch.select_scatter(x, x[0], 0, 1),
        "aten::stack": lambda: torch.stack([x, x]),
        "aten::sum": lambda: x.sum(),
        "aten::zeros": lambda: torch.zeros(2, 3, device=device),
        "aten::zeros_like": lambda: torch.zeros_like(x),
        # Python meta functions kept: no C++ kernel answers on meta for these
        "relu": lambda: torch.relu(x),
        "where": lambda: torch.where(mask, x, -x),
        "var": lambda: x.var(0),
        "embedding": lambda: F.embedding(rows, table),
        "unfold": lambda: F.unfold(images, 3),
        "fold": lambda: F.fold(F.unfold(images, 3), (6, 6), 3),
        "conv2d": lambda: F.conv2d(images, torch.ones(4, 3, 3, 3, device=device)),
        "layer_norm": lambda: F.layer_norm(x, (6,)),
        "logsumexp": lambda: x.logsumexp(1),
        "cross_entropy": lambda: F.cross_entropy(x, torch.tensor([0, 1, 2, 3], device=device)),
    }


def test_every_composite_op_answers_on_meta_as_on_the_cpu():
    assert meta_kernels.use_native() is False  # already done for the suite (conftest.py)
    cpu, meta = _calls("cpu"), _calls("meta")
    assert set(meta_kernels.COMPOSITE_ON_META) <= set(cpu)
    for name in cpu:
        real, dry = cpu[name](), meta[name]()
        assert dry.device.type == "meta", name
        assert (dry.shape, dry.dtype) == (real.shape, real.dtype), name


def test_an_op_without_a_meta_kernel_still_fails_on_meta_as_it_should():
    mask = torch.ones(4, 6, device="meta") > 0
    with pytest.raises(NotImplementedError):  # data-dependent: a mask's size needs the data
        torch.ones(4, 6, device="meta")[mask]


def test_the_article_s_dry_run_loads_nothing_of_torch_compile():
    """A fresh process: the server's warm-up dry-runs the article without sympy or dynamo
    (~85 MB and ~1 s that a server which never compiles would carry)."""
    code = (
        "import sys, torch\n"
        "from app.ops import meta_kernels\n"
        "meta_kernels.use_native()\n"
        "from app.main import warm_up\n"
        "warm_up()\n"
        "print(sorted(m for m in ('sympy', 'torch._dynamo', 'torch._inductor') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
