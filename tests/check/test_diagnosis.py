"""Why a gradient is wrong (issue 32): `check.tensors[name].diagnosis`.

Each kind is produced here by exactly the slip it names, on makemore part 4's exercise 1 (the
`makemore` preset) or a square network, and on /api/run's formulas; a gradient wrong for two
reasons is `unknown`; a correct program gets no diagnosis anywhere (float32 and float64, and a
property test over random correct programs). The core's hypotheses are also tested on bare
tensors: rounding never passes for a scale."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.check.diagnosis import (
    Evidence,
    diagnose,
    explain,
    has_repeats,
    name_factor,
    one_write_delta,
)
from app.check.tolerance import compare
from app.programs import presets
from tests.scripts import run_script

BACKWARD = presets.MAKEMORE_BACKWARD
DC_LOOP = """\
for k in range(Xb.shape[0]):
    for j in range(Xb.shape[1]):
        dC[Xb[k, j]] += demb[k, j]
"""


def program(client, backward: str, **changes) -> dict:
    body = {**presets.preset("makemore")["request"], "backward": backward, **changes}
    r = client.post("/api/program", json=body)
    assert r.status_code == 200, r.text
    return r.json()["check"]


def slip(client, old: str, new: str, **changes) -> dict:
    assert old in BACKWARD
    return program(client, BACKWARD.replace(old, new), **changes)


def diagnosed(check: dict) -> dict[str, dict]:
    return {n: r["diagnosis"] for n, r in check["tensors"].items() if r.get("diagnosis")}


# --------------------------------------------------------------------------- programs: kinds


@pytest.mark.parametrize(
    ("old", "new", "grad", "words", "factor"),
    [
        ("dbnmeani = -dbndiff.sum(0, keepdim=True)", "dbnmeani = -dbndiff.mean(0, keepdim=True)",
         "bnmeani", "1/n", 1 / 32),
        ("dbndiff2 = torch.ones_like(bndiff2) * dbnvar / (n - 1)",
         "dbndiff2 = torch.ones_like(bndiff2) * dbnvar / n", "bndiff2", "(n-1)/n", 31 / 32),
        ("dh = dlogits @ W2.T", "dh = 2 * dlogits @ W2.T", "h", "2", 2.0),
    ],
    ids=["mean-for-sum", "bessel", "twice"],
)  # fmt: skip
def test_a_constant_factor_is_a_scale_named_in_words(client, old, new, grad, words, factor):
    check = slip(client, old, new)
    assert check["first_failure"] == grad
    d = check["tensors"][grad]["diagnosis"]
    assert d["kind"] == "scale", d
    assert d["factor"] == pytest.approx(factor, rel=1e-5)
    assert d["factor_words"] == words
    assert grad in d["message"] and words in d["message"]
    # every failure after it reads it, directly or through others: upstream, rooted at it
    later = {n: x for n, x in diagnosed(check).items() if n != grad}
    assert later and all(x["kind"] == "upstream" for x in later.values()), later
    assert all(x.get("root", x["from"]) == grad for x in later.values())


def test_the_mean_for_sum_slip_upstream_names_what_the_line_reads(client):
    check = slip(client, "dbnmeani = -dbndiff.sum(0, keepdim=True)",
                 "dbnmeani = -dbndiff.mean(0, keepdim=True)")  # fmt: skip
    hprebn = check["tensors"]["hprebn"]["diagnosis"]
    assert hprebn["kind"] == "upstream" and hprebn["from"] == "bnmeani"
    assert "dbnmeani" in hprebn["message"]
    w1 = check["tensors"]["W1"]["diagnosis"]
    assert w1["from"] == "hprebn" and w1["root"] == "bnmeani"


def test_a_negated_gradient_is_a_sign(client):
    check = slip(client, "dW2 = h.T @ dlogits", "dW2 = -(h.T @ dlogits)")
    assert diagnosed(check) == {"W2": check["tensors"]["W2"]["diagnosis"]}
    assert check["tensors"]["W2"]["diagnosis"]["kind"] == "sign"


SQUARE = {
    "inputs": {
        "x": {"shape": [16, 6], "grad": False},
        "W1": {"shape": [6, 6], "scale": 0.4},
        "W2": {"shape": [6, 6], "scale": 0.4},
    },
    "forward": "h = torch.tanh(x @ W1)\nout = h @ W2\nloss = (out ** 2).mean()\n",
    "backward": (
        "dout = 2 * out / out.numel()\n"
        "dW2 = h.T @ dout\n"
        "dh = dout @ W2.T\n"
        "dW1 = x.T @ ((1 - h ** 2) * dh)\n"
    ),
}


def square(client, old: str = "", new: str = "") -> dict:
    body = {**SQUARE, "backward": SQUARE["backward"].replace(old, new)}
    r = client.post("/api/program", json=body)
    assert r.status_code == 200, r.text
    return r.json()["check"]


def test_a_transposed_square_weight_is_a_transpose(client):
    assert square(client)["all_close"]
    check = square(client, "dW2 = h.T @ dout", "dW2 = dout.T @ h")
    assert check["tensors"]["W2"]["diagnosis"]["kind"] == "transpose"
    assert check["tensors"]["W1"]["diagnosis"] is None  # W1 does not read dW2


def test_a_transpose_and_a_sign_at_once_is_unknown(client):
    check = square(client, "dW2 = h.T @ dout", "dW2 = -(dout.T @ h)")
    d = check["tensors"]["W2"]["diagnosis"]
    assert d["kind"] == "unknown", d


def test_a_sign_and_a_factor_at_once_is_unknown(client):
    check = slip(client, "dW2 = h.T @ dlogits", "dW2 = -(h.T @ dlogits) / n")
    assert check["tensors"]["W2"]["diagnosis"]["kind"] == "unknown"


def test_a_gradient_not_summed_over_the_batch_is_a_shape(client):
    check = slip(client, "db2 = dlogits.sum(0)", "db2 = dlogits")
    d = check["tensors"]["b2"]["diagnosis"]
    assert d["kind"] == "shape"
    assert "summed over the broadcast dims it is autograd's" in d["message"]


@pytest.mark.parametrize(
    ("dropped", "grad", "missing", "kept"),
    [
        ("dcounts += torch.ones_like(counts) * dcounts_sum\n", "counts", "counts_sum", "probs"),
        ("dbndiff += 2 * bndiff * dbndiff2\n", "bndiff", "bndiff2", "bnraw"),
    ],
    ids=["counts", "bndiff"],
)
def test_a_tensor_used_twice_missing_one_part_is_a_missing_branch(
    client, dropped, grad, missing, kept
):
    check = slip(client, dropped, "")
    assert check["first_failure"] == grad
    d = check["tensors"][grad]["diagnosis"]
    assert d["kind"] == "missing_branch", d
    assert d["missing"] == [missing]
    assert f"through {kept} but not the part through {missing}" in d["message"]


def test_repeated_ids_through_an_indexed_add_are_dropped_duplicates(client):
    check = slip(client, DC_LOOP, "dC[Xb] += demb\n")
    assert check["first_failure"] == "C"
    assert check["tensors"]["C"]["diagnosis"]["kind"] == "dropped_duplicates"


def test_a_float_in_a_float64_run_is_precision(client):
    check = slip(client, "dW2 = h.T @ dlogits", "dW2 = (h.T @ dlogits).float()", dtype="float64")
    assert check["first_failure"] == "W2"
    assert check["tensors"]["W2"]["diagnosis"]["kind"] == "precision"
    assert {n for n, d in diagnosed(check).items()} == {"W2"}  # nothing reads dW2


def test_the_hand_written_tanh_hint_is_the_unknown_message(client):
    check = slip(client, "dhpreact = (1.0 - h ** 2) * dh", "dhpreact = (1.0 - hpreact ** 2) * dh")
    d = check["tensors"]["hpreact"]["diagnosis"]
    assert d["kind"] == "unknown" and "tanh's derivative" in d["message"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_correct_program_has_no_diagnosis(client, dtype):
    check = program(client, BACKWARD, dtype=dtype)
    assert check["all_close"], {n: r["max_abs_err"] for n, r in check["tensors"].items()}
    assert all(r["diagnosis"] is None for r in check["tensors"].values())


# --------------------------------------------------------------------------- formulas

SMALL = {"batch": 6, "in_features": 5, "hidden": [5], "seed": 3}


def formula_check(client, formulas: dict, **config) -> dict:
    r = client.post("/api/run", json={**SMALL, **config, "formulas": formulas})
    assert r.status_code == 200, r.text
    check = r.json()["check"]
    return {**check["tensors"], **check["intermediates"]}


@pytest.mark.parametrize(
    ("formula", "kind"),
    [
        ("x.T @ l1.g / x.shape[0]", "scale"),
        ("-(x.T @ l1.g)", "sign"),
        ("(x.T @ l1.g).T", "transpose"),
        ("-(x.T @ l1.g).T", "unknown"),
    ],
)
def test_a_formula_slip_is_diagnosed(client, formula, kind):
    rows = formula_check(client, {"w1.g": formula})
    assert rows["w1"]["diagnosis"]["kind"] == kind
    assert [n for n, r in rows.items() if r["diagnosis"]] == ["w1"]


def test_a_formula_downstream_of_a_wrong_one_is_upstream(client):
    rows = formula_check(client, {"l1.g": "-(l1 > 0).float() * a1.g"})
    assert rows["l1"]["diagnosis"]["kind"] == "sign"
    for name in ("x", "w1", "b1"):
        assert rows[name]["diagnosis"] == {
            "kind": "upstream", "from": "l1", "message": rows[name]["diagnosis"]["message"]
        }  # fmt: skip
        assert "l1.g" in rows[name]["diagnosis"]["message"]


def test_correct_formulas_have_no_diagnosis(client):
    rows = formula_check(client, {"w1.g": "x.T @ l1.g", "l1.g": "(l1 > 0).float() * a1.g"})
    assert all(r["allclose"] and r["diagnosis"] is None for r in rows.values())


# --------------------------------------------------------------------------- the core alone


def _close(g: torch.Tensor, h: torch.Tensor) -> bool:
    return bool(compare(g.to(h.dtype), h)["allclose"])


def test_rounding_never_passes_for_a_scale():
    g = torch.Generator().manual_seed(0)
    R = torch.randn(64, 32, generator=g)
    # off by a few times the tolerance, entry by entry: no constant factor explains it
    G = R * (1 + 3e-4 * torch.randn(64, 32, generator=g))
    assert not _close(G, R)
    assert explain(G, R, _close, (64, 32), "dW") is None
    # a factor within the tolerance of 1 fails nothing, so it is never a diagnosis either
    assert _close(R * (1 + 1e-6), R)
    # a factor close to 1 but past the tolerance is a scale only when it is clear of it
    d = explain(R * 1.01, R, _close, (), "dW")
    assert d["kind"] == "scale" and d["factor"] == pytest.approx(1.01)
    assert explain(R * 1.01 + 0.003 * R.abs().max() * torch.randn(64, 32, generator=g),
                   R, _close, (), "dW") is None  # fmt: skip


def test_an_all_zero_autograd_gradient_is_never_a_scale():
    R = torch.zeros(4, 3)
    G = torch.ones(4, 3)
    assert explain(G, R, _close, (4,), "db") is None
    d = diagnose(G, R, _close, Evidence("db"))
    assert d["kind"] == "unknown"


def test_an_all_zero_written_gradient_is_not_a_scale_of_zero():
    R = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    d = diagnose(torch.zeros(4, 3), R, _close, Evidence("db"))
    assert d["kind"] == "unknown" and "zero everywhere" in d["message"]


def test_factors_are_named_by_the_closest_known_one():
    assert name_factor(1 / 32, (32, 64)) == ("1/n", 32)
    assert name_factor(64 / 63, (32, 64)) == ("n/(n-1)", 64)
    assert name_factor(1 / (32 * 3), (32, 3)) == ("1/n", 96)  # a mean over B * T
    assert name_factor(0.5, ()) == ("1/2", None)
    assert name_factor(0.3127, (32,)) is None


def test_one_write_per_index_is_replayed_as_pytorch_writes():
    ids = torch.tensor([0, 2, 2, 2, 1])
    update = torch.arange(15.0).reshape(5, 3)
    kept = torch.zeros(4, 3)
    kept[ids] += update  # PyTorch: one write per index
    summed = torch.zeros(4, 3).index_add_(0, ids, update)
    assert not torch.equal(kept, summed)
    assert torch.equal(kept + one_write_delta((4, 3), ids, update), summed)
    assert has_repeats(ids) and not has_repeats(torch.tensor([3, 1, 0]))
    assert not has_repeats(torch.tensor([True, False, True]))
    assert has_repeats((torch.tensor([0, 0]), torch.tensor([1, 1])))
    assert not has_repeats((torch.tensor([0, 0]), torch.tensor([0, 1])))


def test_parts_that_do_not_add_up_never_make_a_missing_branch():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    ev = Evidence("dx", parts=lambda: {"p": a, "q": b})
    assert diagnose(a, a + b, _close, ev)["kind"] == "missing_branch"
    ev = Evidence("dx", parts=lambda: {"p": a, "q": b * 0.5})  # not autograd's split
    assert diagnose(a, a + b, _close, ev)["kind"] == "unknown"


# --------------------------------------------------------------------------- property

LAYERS = {  # forward, backward (from d<out> to d<in>), for out = f(inp)
    "tanh": ("{o} = torch.tanh({i})", "d{i} = (1 - {o} ** 2) * d{o}"),
    "relu": ("{o} = {i}.relu()", "d{i} = ({o} > 0).float() * d{o}"),  # relu: 0 at 0
    "square": ("{o} = {i} ** 2", "d{i} = 2 * {i} * d{o}"),
    "scale": ("{o} = {i} * 0.5", "d{i} = 0.5 * d{o}"),
    "center": ("{o} = {i} - {i}.mean(0, keepdim=True)",
               "d{i} = d{o} - d{o}.mean(0, keepdim=True)"),
    "twice": ("{o} = {i} * {i}.sum(1, keepdim=True)",
              "d{i} = d{o} * {i}.sum(1, keepdim=True)\nd{i} += ({i} * d{o}).sum(1, keepdim=True)"),
}  # fmt: skip


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    layers=st.lists(st.sampled_from(sorted(LAYERS)), min_size=1, max_size=4),
    rows=st.integers(2, 9),
    width=st.integers(2, 7),
    dtype=st.sampled_from(["float32", "float64"]),
    seed=st.integers(0, 1000),
)
def test_a_correct_random_program_is_never_diagnosed(client, layers, rows, width, dtype, seed):
    forward = ["z0 = x @ W"]
    backward = []
    for k, layer in enumerate(layers):
        fwd, bwd = LAYERS[layer]
        forward.append(fwd.format(i=f"z{k}", o=f"z{k + 1}"))
        backward.insert(0, bwd.format(i=f"z{k}", o=f"z{k + 1}"))
    last = f"z{len(layers)}"
    forward.append(f"loss = ({last} * T).sum() / {rows}")
    backward.insert(0, f"d{last} = T / {rows}")
    backward += ["dW = x.T @ dz0", "dx = dz0 @ W.T"]
    body = {
        "inputs": {
            "x": {"shape": [rows, width]},
            "W": {"shape": [width, width], "scale": 0.5},
            "T": {"shape": [rows, width], "grad": False},
        },
        "forward": "\n".join(forward) + "\n",
        "backward": "\n".join(backward) + "\n",
        "dtype": dtype,
        "seed": seed,
    }
    r = client.post("/api/program", json=body)
    assert r.status_code == 200, r.text
    check = r.json()["check"]
    assert check["all_written"]
    diagnoses = {n: r["diagnosis"] for n, r in check["tensors"].items() if r["diagnosis"]}
    assert check["all_close"] and not diagnoses, (body["forward"], body["backward"], diagnoses)


# --------------------------------------------------------------------------- the export


@pytest.mark.slow
def test_the_exported_script_prints_the_diagnosis(client, tmp_path):
    body = {**presets.preset("makemore")["request"], "backward": BACKWARD.replace(
        "dbnmeani = -dbndiff.sum(0, keepdim=True)", "dbnmeani = -dbndiff.mean(0, keepdim=True)")}  # fmt: skip
    r = client.post("/api/export", json={"program": body, "format": "py"})
    assert r.status_code == 200
    path = tmp_path / "program.py"
    path.write_text(r.text)
    done = run_script([path], timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    out = done.stdout
    assert "why: dbnmeani is autograd's gradient times 1/n (n = 32)" in out
    assert "why: dhprebn is computed from dbnmeani, which is already wrong" in out
    assert any(ln.startswith("differs from autograd:") for ln in out.splitlines())
    assert "first failure: dbnmeani" in out
