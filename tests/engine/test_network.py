"""Manual gradients against autograd over many configs, with the comparison written here
(not only app/check/autograd.py's), so a bug in the check cannot hide a bug in the engine."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from app.check import autograd as check
from app.check import tolerance
from app.engine.network import Network
from app.engine.tensors import make_tensors
from app.ops import Context
from app.runs import pipeline
from app.schemas import RunRequest

TOL = {
    torch.float32: dict(rtol=1e-4, atol_scale=1e-5),
    torch.float64: dict(rtol=1e-9, atol_scale=1e-12),
}


def assert_matches_autograd(manual: torch.Tensor, reference: torch.Tensor, name: str) -> None:
    tol = TOL[reference.dtype]
    scale = reference.abs().max()
    assert scale > 0, f"{name}: the reference gradient is all zero; the config tests nothing"
    err = (manual - reference).abs().max()
    assert torch.allclose(manual, reference, rtol=tol["rtol"], atol=tol["atol_scale"] * scale), (
        f"{name}: max abs err {err.item():.3g}, max|ref| {scale.item():.3g}"
    )


def manual_and_reference(**fields):
    cfg = RunRequest(**fields)
    tensors = make_tensors(cfg)
    net = Network.from_config(cfg)
    env = net.forward(tensors)
    manual = net.backward(env, Context(strategy=cfg.strategy, chunk_bytes=64 << 10))
    leaves = {n: t.clone().requires_grad_(n != "target") for n, t in tensors.items()}
    loss = check.reference_loss(cfg, leaves)
    loss.backward()
    assert env["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    return manual, {n: t.grad for n, t in leaves.items() if n != "target"}


CONFIGS = [
    dict(hidden=hidden, activation=act, dtype=dtype)
    for hidden, act, dtype in itertools.product(
        [[], [16], [16, 12], [16, 12, 8]],
        ["relu", "leaky_relu", "tanh", "sigmoid"],
        ["float32", "float64"],
    )
]


@pytest.mark.parametrize(
    "fields", CONFIGS, ids=lambda f: f"{f['activation']}-{len(f['hidden'])}-{f['dtype']}"
)
def test_depths_activations_dtypes(fields):
    manual, reference = manual_and_reference(batch=12, in_features=9, init="kaiming", **fields)
    assert set(manual) >= set(reference)
    for name, ref in reference.items():
        assert_matches_autograd(manual[name], ref, name)


@pytest.mark.parametrize("batch", [1, 13, [3, 4], [2, 3, 2], [1, 2, 1, 3]])
@pytest.mark.parametrize("out_features", [1, 3])
def test_leading_dims_and_outputs(batch, out_features):
    manual, reference = manual_and_reference(
        batch=batch, in_features=5, hidden=[16], out_features=out_features, init="xavier", seed=1
    )
    for name, ref in reference.items():
        assert manual[name].shape == ref.shape
        assert_matches_autograd(manual[name], ref, name)


@pytest.mark.parametrize("init", ["randn", "kaiming", "xavier"])
@pytest.mark.parametrize("strategy", ["broadcast", "einsum", "matmul"])
def test_inits_and_strategies(init, strategy):
    manual, reference = manual_and_reference(
        batch=40, in_features=30, hidden=[20, 10], init=init, strategy=strategy, init_scale=0.5
    )
    for name, ref in reference.items():
        assert_matches_autograd(manual[name], ref, name)


def test_chunked_broadcast_uses_several_chunks_and_agrees():
    """A chunk cap far below the (N, in, out) product still gives autograd's numbers."""
    cfg = RunRequest(batch=50, in_features=40, hidden=[30], dtype="float64")
    net = Network.from_config(cfg)
    env = net.forward(make_tensors(cfg))
    tiny = net.backward(env, Context("broadcast", chunk_bytes=40 * 30 * 8 * 3))  # 3 rows a chunk
    whole = net.backward(env, Context("broadcast", chunk_bytes=1 << 30))  # one chunk
    matmul = net.backward(env, Context("matmul"))
    for name in ("x", "w1", "b1", "w2"):
        torch.testing.assert_close(tiny[name], whole[name], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(tiny[name], matmul[name], rtol=1e-12, atol=1e-12)


def test_relu_gradient_at_exactly_zero_is_zero():
    """(x > 0) gives 0 at 0, as torch.relu; clamp_min's autograd would give 1 there."""
    cfg = RunRequest(batch=4, in_features=3, hidden=[2], dtype="float64")
    tensors = make_tensors(cfg)
    tensors["b1"] = -(tensors["x"] @ tensors["w1"])[0]  # row 0's pre-activations exactly 0
    net = Network.from_config(cfg)
    env = net.forward(tensors)
    assert (env["l1"][0] == 0).all()
    manual = net.backward(env, Context())
    reference = check.autograd_gradients(cfg, tensors)
    assert (manual["l1"][0] == 0).all()
    for name in ("x", "w1", "b1"):
        torch.testing.assert_close(manual[name], reference[name])


def test_check_reports_wrong_and_all_zero_gradients():
    ref = torch.randn(50, 20, dtype=torch.float32) * 100
    good = tolerance.compare(ref + 1e-7 * ref.abs().max(), ref)
    assert good["allclose"] and not good["exact"]
    zero = tolerance.compare(torch.zeros_like(ref), ref)
    assert not zero["allclose"] and zero["max_rel_err"] == pytest.approx(1.0)
    off = ref.clone()
    off[3, 4] += 0.01 * ref.abs().max()  # one entry wrong by 1% of the scale
    assert not tolerance.compare(off, ref)["allclose"]
    assert tolerance.compare(torch.zeros(3), torch.zeros(3)) == {
        "max_abs_err": 0.0, "max_rel_err": 0.0, "allclose": True, "exact": True, "rtol": 1e-4, "atol": 0.0,
    }  # fmt: skip
    assert not tolerance.compare(-ref, ref)["allclose"]  # signs matter: |a - b|, not a - b


def test_pipeline_flags_a_broken_op(monkeypatch):
    """If an op's backward were wrong, the API's check must say so."""
    from app.ops.activations import ReLU

    def wrong(self, g, l, *, result):  # noqa: E741
        return {l.expr: lambda: (l > 1).float() * g}  # a wrong threshold

    monkeypatch.setattr(ReLU, "backward", wrong)
    result = pipeline.run(RunRequest(batch=20, in_features=6, hidden=[5]), chunk_bytes=1 << 20)
    assert result["check"]["all_close"] is False
    assert result["check"]["tensors"]["x"]["allclose"] is False
    assert result["check"]["tensors"]["w2"]["allclose"] is True  # above the relu: unaffected


@pytest.mark.parametrize(
    "fields",
    [
        {"batch": 8, "in_features": 4, "hidden": [1], "norm": "layernorm"},
        {"batch": 8, "in_features": 4, "hidden": [2], "norm": "layernorm"},
        {"batch": 2, "in_features": 4, "hidden": [5], "norm": "batchnorm"},
        {"batch": 8, "in_features": 1, "hidden": [5], "norm": "batchnorm"},
        {"batch": [1, 2], "in_features": 3, "hidden": [3, 1], "out_features": 2, "norm": "batchnorm", "seed": 322835},
        {
            "batch": [2, 2], "in_features": 2, "hidden": [1], "out_features": 3, "activation": "leaky_relu",
            "norm": "layernorm", "loss": "cross_entropy", "dtype": "float64", "seed": 122906, "init": "xavier",
        },
        {"batch": 2, "in_features": 4, "hidden": [2, 2], "out_features": 3, "norm": "batchnorm", "dtype": "float64", "seed": 230831, "init": "kaiming", "activation": "leaky_relu"},
    ],
)  # fmt: skip
def test_cancelling_gradients_are_judged_against_the_rounding_both_sides_carry(fields):
    """Gradients that cancel to ~0 are rounding noise on both sides: the check reruns both
    in the other precision to measure that noise, and passes a manual gradient within it."""
    result = pipeline.run(RunRequest(**fields), chunk_bytes=1 << 20)
    assert result["check"]["all_close"] is True
    checks = [*result["check"]["tensors"].values(), *result["check"]["intermediates"].values()]
    rechecked = [c for c in checks if "rounding_noise" in c]
    assert rechecked, "this config should need the rounding recheck"
    for c in rechecked:
        assert c["atol"] >= 4 * c["rounding_noise"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_wrong_formula_stays_wrong_through_the_rounding_recheck(monkeypatch, dtype):
    """The recheck widens the tolerance only by rounding noise, which a formula error
    (independent of the precision) stands far above."""
    from app.ops.activations import Tanh

    def off_by_a_tenth_of_a_percent(self, g, l, *, result):  # noqa: E741
        return {l.expr: lambda: (1 - result.pow(2)) * g * 1.001}

    monkeypatch.setattr(Tanh, "backward", off_by_a_tenth_of_a_percent)
    cfg = RunRequest(
        batch=16, in_features=6, hidden=[5], activation="tanh", norm="layernorm", dtype=dtype
    )
    result = pipeline.run(cfg, chunk_bytes=1 << 20)
    assert result["check"]["all_close"] is False
    x = result["check"]["tensors"]["x"]
    assert x["allclose"] is False and "rounding_noise" in x  # rechecked, still wrong


def test_check_compares_large_gradients_chunk_by_chunk_without_missing_an_entry():
    n = 2 * tolerance.COMPARE_CHUNK + 5  # three chunks, the last one short
    ref = torch.randn(n, dtype=torch.float64)
    assert tolerance.compare(ref * (1 + 1e-12), ref)["allclose"]
    wrong = ref.clone()
    wrong[-1] += 1.0  # in the last, short chunk
    result = tolerance.compare(wrong, ref)
    assert not result["allclose"] and result["max_abs_err"] == pytest.approx(1.0)
    wrong[-1] = float("nan")
    result = tolerance.compare(wrong, ref)
    assert not result["allclose"] and math.isnan(result["max_abs_err"])


def test_a_float32_autograd_that_rounds_more_than_the_manual_side_is_recognized():
    """Over 100k rows, autograd's float32 matmul for w.g rounds at ~1e-4 while the chunked
    broadcast form (float64 accumulation of its partial sums) stays at ~1e-8: the first
    comparison fails, and the rounding recheck sees that autograd itself moved by that much."""
    cfg = RunRequest(batch=100_000, in_features=4, hidden=[4], out_features=3, loss="cross_entropy")
    result = pipeline.run(cfg, chunk_bytes=4 << 20)
    w2 = result["check"]["tensors"]["w2"]
    # a correct formula is never failed by autograd's own rounding
    assert w2["allclose"] is True
    assert result["check"]["all_close"] is True
    # how much float32's matmul rounds over 100k rows depends on the BLAS build and its
    # threads: where it passed the plain tolerance there was nothing to recheck; where it
    # did not, the recheck must have measured the rounding and said so
    if w2["max_rel_err"] > 1e-4:
        assert "rounding_noise" in w2
