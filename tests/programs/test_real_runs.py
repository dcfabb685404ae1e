"""The interpreter's real runs take shortcuts the dry run does not need (app/lab/statements.py,
app/programs/plan.py: a loop line's second record only counts, grad_of is remembered per name,
the tensor last found writable is not looked up again): these pin that what they compute,
record and refuse is what the statements say, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from app.lab.statements import ProgramError, parse_program
from app.ops.traced import Traced
from app.programs import presets
from app.programs.plan import BackwardRun, admit
from app.programs.run import execute_once
from app.programs.schemas import ProgramRequest
from tests.programs.test_programs import STUDENT_BACKWARD


def student_backward(f: dict, n: int) -> dict[str, torch.Tensor]:
    """STUDENT_BACKWARD in plain torch (as a notebook runs it), over the forward's values."""
    dlogprobs = torch.zeros_like(f["logprobs"])
    dlogprobs[range(n), f["Yb"]] = -1.0 / n
    dprobs = (1.0 / f["probs"]) * dlogprobs
    dcounts_sum_inv = (f["counts"] * dprobs).sum(1, keepdim=True)
    dcounts = f["counts_sum_inv"] * dprobs
    dcounts_sum = (-(f["counts_sum"] ** -2)) * dcounts_sum_inv
    dcounts += torch.ones_like(f["counts"]) * dcounts_sum
    dnorm_logits = f["counts"] * dcounts
    dlogits = dnorm_logits.clone()
    dlogit_maxes = (-dnorm_logits).sum(1, keepdim=True)
    logits = f["logits"]
    dlogits += F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]) * dlogit_maxes
    dh = dlogits @ f["W2"].T
    dW2 = f["h"].T @ dlogits
    db2 = dlogits.sum(0)
    dhpreact = (1.0 - f["h"] ** 2) * dh
    dbngain = (f["bnraw"] * dhpreact).sum(0, keepdim=True)
    dbnraw = f["bngain"] * dhpreact
    dbnbias = dhpreact.sum(0, keepdim=True)
    dbndiff = f["bnvar_inv"] * dbnraw
    dbnvar_inv = (f["bndiff"] * dbnraw).sum(0, keepdim=True)
    dbnvar = (-0.5 * (f["bnvar"] + 1e-5) ** -1.5) * dbnvar_inv
    dbndiff2 = (1.0 / (n - 1)) * torch.ones_like(f["bndiff2"]) * dbnvar
    dbndiff += (2 * f["bndiff"]) * dbndiff2
    dhprebn = dbndiff.clone()
    dbnmeani = (-dbndiff).sum(0)
    dhprebn += 1.0 / n * (torch.ones_like(f["hprebn"]) * dbnmeani)
    dembcat = dhprebn @ f["W1"].T
    dW1 = f["embcat"].T @ dhprebn
    db1 = dhprebn.sum(0)
    demb = dembcat.view(f["emb"].shape)
    dC = torch.zeros_like(f["C"])
    Xb = f["Xb"]
    for k in range(Xb.shape[0]):
        for j in range(Xb.shape[1]):
            ix = Xb[k, j]
            dC[ix] += demb[k, j]
    names = dict(locals())
    return {name[1:]: t for name, t in names.items() if name.startswith("d")}


def makemore(dtype: torch.dtype = torch.float32):
    req = ProgramRequest(**{**presets.preset("makemore")["request"], "backward": STUDENT_BACKWARD})
    plan = admit(req, 1 << 30, 30.0)
    return req, plan, execute_once(req, plan, dtype, lambda: None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_gradient_of_the_student_cell_is_plain_torch_bit_for_bit(dtype):
    req, plan, out = makemore(dtype)
    assert out.error is None
    forward = {n: v.t if isinstance(v, Traced) else v for n, v in out.forward.items()}
    reference = student_backward(forward, out.inputs["n"])
    assert sorted(out.manual) == sorted(reference) and len(reference) == 26
    for name, t in reference.items():
        assert out.manual[name].dtype == dtype
        assert torch.equal(out.manual[name], t), name


def test_a_real_runs_line_records_are_the_dry_runs():
    """Every line's runs (a loop body's 96), target and gradient as the dry run counted them;
    and every gradient's lines."""
    req, plan, out = makemore()
    env = {n: v for n, v in out.forward.items()}
    bwd = BackwardRun(plan.backward, env, set(plan.has_grad), lambda: None)
    with torch.no_grad():
        bwd.run()
    real = {n: (e.line, e.code, e.target, e.runs, e.grad_of) for n, e in bwd.executed.items()}
    dry = {n: (e.line, e.code, e.target, e.runs, e.grad_of) for n, e in plan.backward_lines.items()}
    assert real == dry
    assert real[37] == (37, "dC[ix] += demb[k,j]", "dC", 96, "C")
    assert real[36] == (36, "ix = Xb[k,j]", "ix", 96, None)
    assert all(not e.steps for e in bwd.executed.values())  # a real run traces nothing
    assert bwd.lines == out.lines and bwd.lines["C"] == [33, 37]
    assert bwd.lines["counts"] == [7, 9]  # assigned, then changed in place


def _real_backward(text: str) -> BackwardRun:
    g = torch.Generator().manual_seed(0)
    forward = {"h": Traced(torch.randn(4, 3, generator=g), "h"),
               "ids": Traced(torch.tensor([2, 0, 2, 1]), "ids")}  # fmt: skip
    return BackwardRun(parse_program(text, "backward"), forward, {"h"}, lambda: None)


def test_a_loop_that_rebinds_its_target_to_a_forward_tensor_is_refused_at_the_write():
    """The first pass writes a tensor of its own (remembered as writable); the second writes
    the forward's h through the same name, and is refused as the dry run would refuse it."""
    bwd = _real_backward("dh = torch.zeros_like(h)\nfor i in range(2):\n  dh[0] += 1.0\n  dh = h\n")
    with torch.no_grad(), pytest.raises(ProgramError, match="a tensor of the forward") as err:
        bwd.run()
    assert err.value.line == 3
    assert bwd.executed[3].runs == 1 and bwd.executed[4].runs == 1


def test_a_loop_writing_two_tensors_in_turn_writes_each_and_refuses_a_view_of_the_forward():
    bwd = _real_backward(
        "dh = torch.zeros_like(h)\nacc = torch.zeros(3)\nfor i in range(4):\n"
        "  dh[ids[i]] += h[i]\n  acc += h[i]\n"
    )
    with torch.no_grad():
        bwd.run()
    h, ids = bwd.forward["h"].t, bwd.forward["ids"].t
    want = torch.zeros_like(h)
    for i in range(4):
        want[ids[i]] += h[i]
    assert torch.equal(bwd.gradients["h"].t, want)
    assert torch.equal(bwd.scope["acc"].t, h[0] + h[1] + h[2] + h[3])
    assert bwd.executed[4].runs == 4 and bwd.executed[4].grad_of == "h"
    assert bwd.executed[5].runs == 4 and bwd.executed[5].grad_of is None
    assert bwd.lines == {"h": [1, 4]}
    refused = _real_backward("acc = torch.zeros(3)\nfor i in range(2):\n  acc += h[i]\n  v = h[0]\n"
                             "  v += 1.0\n")  # fmt: skip
    with torch.no_grad(), pytest.raises(ProgramError, match="a tensor of the forward") as err:
        refused.run()
    assert err.value.line == 5 and refused.executed[3].runs == 1


@pytest.mark.parametrize(
    "index, text",
    [
        ((1, 2), "x[1, 2]"),
        (1, "x[1]"),
        ((slice(None), None, Ellipsis), "x[:, None, ...]"),
        ((slice(1, 3, 2), -1), "x[1:3:2, -1]"),
        ((), "x[()]"),
        ((True, 0), "x[True, 0]"),
    ],
)
def test_a_basic_index_reads_as_written_on_real_and_meta_tensors(index, text):
    for device in ("cpu", "meta"):
        x = Traced(torch.zeros(4, 5, device=device), "x")
        got = x[index]
        assert got.expr == text
        assert tuple(got.t.shape) == tuple(torch.zeros(4, 5)[index].shape)
        assert bool(got.steps) == (device == "meta")
