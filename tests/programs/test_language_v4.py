"""The program language, second part (v4): attention, convolution and recurrence written by
hand, checked line by line through POST /api/program.

Each chapter is written here from the maths: a forward in the chapter's own ops, a backward by
hand that the check must find all-close, and a slip of the chapter that the check must flag at
exactly its tensor. The forwards' values are compared with the same network in plain PyTorch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from app.programs.inputs import make_inputs
from app.programs.schemas import ProgramRequest
from tests.scripts import run_script


def post(client, inputs: dict, forward: str, backward: str, dtype: str = "float64", **kw):
    body = {"inputs": inputs, "forward": forward, "backward": backward, "dtype": dtype, **kw}
    r = client.post("/api/program", json=body)
    assert r.status_code == 200, r.text[:800]
    out = r.json()
    assert out["backward_error"] is None, out["backward_error"]
    return out


def rows(body: dict) -> dict:
    return body["check"]["tensors"]


def assert_all_close(body: dict, written: list[str]) -> None:
    table = rows(body)
    for name in written:
        assert table[name]["written"], name
        assert table[name]["shape_ok"] and table[name]["allclose"], (name, table[name])
    assert body["check"]["all_close"], {n: r["max_abs_err"] for n, r in table.items()}


def slip(backward: str, old: str, new: str) -> str:
    assert old in backward, old
    return backward.replace(old, new)


def inputs_of(inputs: dict, dtype: str = "float64", seed: int = 0) -> dict:
    made = make_inputs(ProgramRequest(inputs=inputs, forward="loss = 0").inputs, seed, dtype)
    return {n: v.to(torch.float64) if v.is_floating_point() else v for n, v in made.items()}


# --------------------------------------------------------------------------- making tensors

MAKE_INPUTS = {"x": {"shape": [4, 3]}}
MAKE_FORWARD = """\
z = torch.zeros(4, 3) + x
o = torch.ones((4, 3)) * z
f = torch.full((4, 3), 2.0) * o + torch.empty(x.shape)
y = f @ torch.eye(3) + torch.triu(torch.ones(3, 3), diagonal=1)[0]
loss = (y * torch.arange(0, 6, 2)).sum()
"""
MAKE_BACKWARD = """\
dy = torch.ones(4, 3) * torch.arange(0, 6, 2)
df = dy @ torch.eye(3).T
do = df * 2.0
dz = do * torch.ones(4, 3)
dx = dz.clone()
"""


def test_made_tensors_take_the_run_dtype_and_check(client):
    for dtype in ("float64", "float32"):
        body = post(client, MAKE_INPUTS, MAKE_FORWARD, MAKE_BACKWARD, dtype)
        assert_all_close(body, ["y", "f", "o", "z", "x"])
        assert body["tensors"]["z"]["dtype"] == dtype
    x = inputs_of(MAKE_INPUTS)["x"]
    want = ((2.0 * x + torch.tensor([0.0, 1, 1])) * torch.arange(0, 6, 2)).sum()
    assert body["loss"] == pytest.approx(float(want), rel=1e-5)
    wrong = post(client, MAKE_INPUTS, MAKE_FORWARD, slip(MAKE_BACKWARD, "df * 2.0", "df * 1.0"))
    assert not rows(wrong)["o"]["allclose"] and rows(wrong)["y"]["allclose"]


def test_arange_and_full_follow_torch_dtypes(client):
    forward = ("i = torch.arange(4)\nj = torch.full((4,), 1)\nk = torch.arange(0.0, 2.0, 0.5)\n"
               "loss = (x[i, j] * k).sum()\n")  # fmt: skip
    body = post(client, MAKE_INPUTS, forward, "dx = torch.zeros_like(x)\ndx[:, 1] = k\n")
    assert body["tensors"]["i"]["dtype"] == "int64" and body["tensors"]["j"]["dtype"] == "int64"
    assert body["tensors"]["k"]["dtype"] == "float64"
    assert_all_close(body, ["x"])


# --------------------------------------------------------------------------- draws

DROP_INPUTS = {"x": {"shape": [6, 5]}}
DROP_FORWARD = """\
keep = (torch.rand(6, 5) < 0.5).float() / 0.5
y = x * keep
d = F.dropout(y, 0.25)
loss = (d ** 2).sum() + torch.randn(5).sum()
"""
DROP_BACKWARD = """\
dd = 2 * d
dy = dd * (d != 0) / 0.75
dx = dy * keep
"""


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_rand_and_dropout_draw_from_the_run_generator_as_pytorch_would(client, dtype):
    body = post(client, DROP_INPUTS, DROP_FORWARD, DROP_BACKWARD, dtype)
    assert_all_close(body, ["d", "y", "x"])
    assert not body["check"]["suspects"]
    again = post(client, DROP_INPUTS, DROP_FORWARD, DROP_BACKWARD, dtype)
    assert again["loss"] == body["loss"]  # seeded: the same request, the same draws
    # plain PyTorch: the global generator continues the inputs' (seed 0), default dtype the run's
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g).to(getattr(torch, dtype))
    torch.set_rng_state(g.get_state())
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        keep = (torch.rand(6, 5) < 0.5).float() / 0.5
        loss = (F.dropout(x * keep, 0.25) ** 2).sum() + torch.randn(5).sum()
    finally:
        torch.set_default_dtype(default)
    assert body["loss"] == pytest.approx(float(loss), rel=1e-6)
    wrong = post(client, DROP_INPUTS, DROP_FORWARD, slip(DROP_BACKWARD, "/ 0.75", ""), dtype)
    assert not rows(wrong)["y"]["allclose"] and rows(wrong)["d"]["allclose"]


# --------------------------------------------------------------------------- attention

GPT_INPUTS = {
    "x": {"shape": [2, 5, 8]},
    "Wq": {"shape": [8, 8], "scale": 0.3},
    "Wk": {"shape": [8, 8], "scale": 0.3},
    "Wv": {"shape": [8, 8], "scale": 0.3},
    "target": {"shape": [2, 5, 8], "grad": False},
}
GPT_FORWARD = """\
B, T, C = x.shape
nh = 2
hs = C // nh
q = (x @ Wq).view(B, T, nh, hs).transpose(1, 2)   # (B, nh, T, hs)
k = (x @ Wk).view(B, T, nh, hs).transpose(1, 2)
v = (x @ Wv).view(B, T, nh, hs).transpose(1, 2)
mask = torch.tril(torch.ones(T, T))
att = (q @ k.transpose(-2, -1)) * hs ** -0.5      # (B, nh, T, T)
att = att.masked_fill(mask == 0, float('-inf'))
p = F.softmax(att, dim=-1)
y = p @ v
out = y.transpose(1, 2).contiguous().view(B, T, C)
loss = (out * target).sum()
"""
GPT_BACKWARD = """\
dout = target
dy = dout.view(B, T, nh, hs).transpose(1, 2)
dp = dy @ v.transpose(-2, -1)
dv = p.transpose(-2, -1) @ dy
datt = p * (dp - (p * dp).sum(-1, keepdim=True))
dq = (datt @ k) * hs ** -0.5
dk = (datt.transpose(-2, -1) @ q) * hs ** -0.5
dWq = x.view(B * T, C).T @ dq.transpose(1, 2).reshape(B * T, C)
dWk = x.view(B * T, C).T @ dk.transpose(1, 2).reshape(B * T, C)
dWv = x.view(B * T, C).T @ dv.transpose(1, 2).reshape(B * T, C)
dx = (dq.transpose(1, 2).reshape(B, T, C) @ Wq.T + dk.transpose(1, 2).reshape(B, T, C) @ Wk.T
      + dv.transpose(1, 2).reshape(B, T, C) @ Wv.T)
"""
GPT_GRADS = ["y", "p", "v", "att", "q", "k", "Wq", "Wk", "Wv", "x"]


def gpt_autograd(dtype: str) -> dict[str, torch.Tensor]:
    t = inputs_of(GPT_INPUTS)
    p = {n: t[n].clone().requires_grad_() for n in ("x", "Wq", "Wk", "Wv")}
    B, T, C = 2, 5, 8
    heads = [(p["x"] @ p[w]).view(B, T, 2, 4).transpose(1, 2) for w in ("Wq", "Wk", "Wv")]
    att = heads[0] @ heads[1].transpose(-2, -1) / math.sqrt(4)
    att = att.masked_fill(torch.tril(torch.ones(T, T)) == 0, float("-inf"))
    out = (att.softmax(-1) @ heads[2]).transpose(1, 2).reshape(B, T, C)
    (out * t["target"]).sum().backward()
    return {n: v.grad for n, v in p.items()}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_causal_multi_head_attention_checks_all_close(client, dtype):
    body = post(client, GPT_INPUTS, GPT_FORWARD, GPT_BACKWARD, dtype)
    assert_all_close(body, GPT_GRADS)
    assert not body["check"]["suspects"]
    assert body["tensors"]["att"]["shape"] == [2, 2, 5, 5]
    if dtype == "float64":  # independent autograd in plain PyTorch
        want = gpt_autograd(dtype)
        assert rows(body)["Wq"]["max_abs_err"] < 1e-10
        grad = body["gradients"]["Wq"]["stats"]
        assert grad["norm"] == pytest.approx(float(want["Wq"].norm()), rel=1e-9)
    # the mask's (T, T) is broadcast over (B, nh, T, T): the trace says so
    steps = body["forward"][8]["steps"]
    assert any(s["op"] == "masked_fill" and s["inputs"][1] == [5, 5] for s in steps), steps


@pytest.mark.parametrize(
    "old, new, tensor",
    [
        ("dq = (datt @ k) * hs ** -0.5", "dq = datt @ k", "q"),  # the scale dropped
        ("(p * dp).sum(-1, keepdim=True)", "(p * dp).sum(-2, keepdim=True)", "att"),  # axis
        ("dv = p.transpose(-2, -1) @ dy", "dv = p @ dy", "v"),
    ],
)
def test_attention_slips_are_flagged_at_their_tensor(client, old, new, tensor):
    body = post(client, GPT_INPUTS, GPT_FORWARD, slip(GPT_BACKWARD, old, new))
    table = rows(body)
    assert not table[tensor]["allclose"], tensor
    assert table["y"]["allclose"] and table["p"]["allclose"]  # the tensors above still match


# --------------------------------------------------------------------------- GPT pieces

LN_INPUTS = {
    "ids": {"value": [[0, 1, 1], [2, 0, 3]]},
    "W": {"shape": [4, 6]},
    "g": {"shape": [6], "init": "ones"},
    "b": {"shape": [6], "init": "zeros"},
    "target": {"shape": [2, 3, 6], "grad": False},
}
LN_FORWARD = """\
D = W.shape[1]
e = F.embedding(ids, W)
h = F.layer_norm(e, (D,), g, b)
a = F.gelu(h, approximate='tanh')
logits = a @ W.T
loss = (logits * target[:, :, :4]).sum()
"""
LN_BACKWARD = """\
dlogits = target[:, :, :4]
da = dlogits @ W
dW = dlogits.reshape(-1, 4).T @ a.reshape(-1, D)
u = 0.7978845608028654 * (h + 0.044715 * h ** 3)
th = torch.tanh(u)
dh = da * (0.5 * (1 + th) + 0.5 * h * (1 - th ** 2) * 0.7978845608028654 * (1 + 3 * 0.044715 * h ** 2))
mu = e.mean(-1, keepdim=True)
rstd = (e.var(-1, keepdim=True, unbiased=False) + 1e-5) ** -0.5
xhat = (e - mu) * rstd
dg = (dh * xhat).sum((0, 1))
db = dh.sum((0, 1))
dxhat = dh * g
de = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
dW.index_add_(0, ids.view(-1), de.view(-1, D))
"""


def test_embedding_layernorm_gelu_and_a_tied_head(client):
    body = post(client, LN_INPUTS, LN_FORWARD, LN_BACKWARD)
    assert_all_close(body, ["logits", "a", "h", "g", "b", "e", "W"])
    assert rows(body)["W"]["lines"] == [3, 14]  # both parts of the tied weight
    t = inputs_of(LN_INPUTS)
    e = F.embedding(t["ids"], t["W"])
    a = F.gelu(F.layer_norm(e, (6,), t["g"], t["b"]), approximate="tanh")
    assert body["loss"] == pytest.approx(float(((a @ t["W"].T) * t["target"][:, :, :4]).sum()))


@pytest.mark.parametrize(
    "old, new",
    [
        ("dW.index_add_(0, ids.view(-1), de.view(-1, D))", "dW[ids] += de"),  # repeated ids
        ("dW.index_add_(0, ids.view(-1), de.view(-1, D))", "dW = dW * 1"),  # tied part forgotten
    ],
)
def test_embedding_slips_are_flagged_at_the_weight(client, old, new):
    body = post(client, LN_INPUTS, LN_FORWARD, slip(LN_BACKWARD, old, new))
    assert not rows(body)["W"]["allclose"]
    assert rows(body)["e"]["allclose"]


def test_index_put_with_accumulate_sums_repeated_ids_and_without_it_does_not(client):
    backward = slip(LN_BACKWARD, "dW.index_add_(0, ids.view(-1), de.view(-1, D))",
                    "dW.index_put_((ids.view(-1),), de.view(-1, D), accumulate=True)")  # fmt: skip
    assert_all_close(post(client, LN_INPUTS, LN_FORWARD, backward), ["W", "e"])
    once = slip(backward, "accumulate=True", "accumulate=False")
    assert not rows(post(client, LN_INPUTS, LN_FORWARD, once))["W"]["allclose"]


# --------------------------------------------------------------------------- convolution

CONV_INPUTS = {
    "x": {"shape": [2, 3, 6, 6]},
    "w": {"shape": [4, 3, 3, 3], "scale": 0.3},
    "b": {"shape": [4]},
    "target": {"shape": [2, 4, 3, 3], "grad": False},
}
CONV_FORWARD = """\
N, C, H, W = x.shape
K = w.shape[0]
cols = F.unfold(x, 3, padding=1)                    # (N, C·3·3, H·W)
out = (w.view(K, -1) @ cols).view(N, K, H, W) + b.view(1, -1, 1, 1)
r = out.relu()
pooled, idx = F.max_pool2d(r, 2, return_indices=True)
loss = (pooled * target).sum()
"""
CONV_BACKWARD = """\
dpooled = target
dr = torch.zeros_like(r).view(N, K, -1)
dr.scatter_add_(2, idx.view(N, K, -1), dpooled.view(N, K, -1))
dr = dr.view(N, K, H, W)
dout = dr * (out > 0)
db = dout.sum((0, 2, 3))
dcols = w.view(K, -1).T @ dout.view(N, K, -1)
dw = (dout.view(N, K, -1) @ cols.transpose(1, 2)).sum(0).view(w.shape)
dx = F.fold(dcols, (H, W), 3, padding=1)
"""


def test_a_conv_layer_through_unfold_and_fold_with_max_pool(client):
    body = post(client, CONV_INPUTS, CONV_FORWARD, CONV_BACKWARD)
    assert_all_close(body, ["pooled", "r", "out", "b", "cols", "w", "x"])
    t = inputs_of(CONV_INPUTS)
    ref = F.max_pool2d(F.conv2d(t["x"], t["w"], t["b"], padding=1).relu(), 2)
    assert body["loss"] == pytest.approx(float((ref * t["target"]).sum()))
    cols = body["forward"][2]["steps"][-1]
    assert cols["op"] == "unfold" and cols["output"] == [2, 27, 36] and "layout" in cols


def test_max_pool_gradient_sent_to_every_entry_of_a_window_is_flagged(client):
    every = "dr = dpooled.unsqueeze(3).unsqueeze(-1).expand(N, K, 3, 2, 3, 2).reshape(N, K, -1)"
    backward = slip(CONV_BACKWARD, "dr.scatter_add_(2, idx.view(N, K, -1), dpooled.view(N, K, -1))",
                    every)  # fmt: skip
    body = post(client, CONV_INPUTS, CONV_FORWARD, backward)
    assert not rows(body)["r"]["allclose"] and rows(body)["pooled"]["allclose"]


def test_conv2d_pad_and_avg_pool_in_the_forward(client):
    forward = """\
xp = F.pad(x, (1, 1, 1, 1))
out = F.conv2d(xp, w, b)
a = F.avg_pool2d(out, 2)
loss = (a * target).sum()
"""
    backward = """\
N, K = target.shape[0], target.shape[1]
dout = (target / 4).unsqueeze(3).unsqueeze(-1).expand(N, K, 3, 2, 3, 2).reshape(N, K, 6, 6)
db = dout.sum((0, 2, 3))
cols = F.unfold(xp, 3)
dw = (dout.view(N, K, -1) @ cols.transpose(1, 2)).sum(0).view(w.shape)
dxp = F.fold(w.view(K, -1).T @ dout.view(N, K, -1), (8, 8), 3)
dx = dxp[:, :, 1:-1, 1:-1]
"""
    body = post(client, CONV_INPUTS, forward, backward)
    assert_all_close(body, ["out", "b", "w", "xp", "x"])
    conv = body["forward"][1]["steps"][-1]
    assert conv["op"] == "conv2d" and conv["output"] == [2, 4, 6, 6]


# --------------------------------------------------------------------------- recurrence

RNN_INPUTS = {
    "x": {"shape": [3, 5, 4]},
    "Wx": {"shape": [4, 6], "scale": 0.4},
    "Wh": {"shape": [6, 6], "scale": 0.4},
    "b": {"shape": [6]},
    "target": {"shape": [3, 5, 6], "grad": False},
}
RNN_FILL = """\
B, T, D = x.shape
H = Wh.shape[0]
h = torch.zeros(B, H)
hs = torch.zeros(B, T, H)
for t in range(T):
    h = torch.tanh(x[:, t] @ Wx + h @ Wh + b)
    hs[:, t] = h
loss = (hs * target).sum()
"""
RNN_LIST = """\
B, T, D = x.shape
H = Wh.shape[0]
h = torch.zeros(B, H)
steps = []
for t in range(T):
    h = torch.tanh(x[:, t] @ Wx + h @ Wh + b)
    steps.append(h)
hs = torch.stack(steps, 1)
loss = (hs * target).sum()
"""
RNN_BACKWARD = """\
dhs = target
dWx = torch.zeros_like(Wx)
dWh = torch.zeros_like(Wh)
db = torch.zeros_like(b)
dx = torch.zeros_like(x)
prev = torch.cat([torch.zeros(B, 1, H), hs[:, :-1]], 1)
dnext = torch.zeros(B, H)
for t in reversed(range(T)):
    dh_t = dhs[:, t] + dnext
    da = dh_t * (1 - hs[:, t] ** 2)
    dWx += x[:, t].T @ da
    dWh += prev[:, t].T @ da
    db += da.sum(0)
    dx[:, t] = da @ Wx.T
    dnext = da @ Wh.T
"""


def rnn_autograd() -> dict[str, torch.Tensor]:
    t = inputs_of(RNN_INPUTS)
    p = {n: t[n].clone().requires_grad_() for n in ("x", "Wx", "Wh", "b")}
    h = torch.zeros(3, 6, dtype=torch.float64)
    out = []
    for step in range(5):
        h = torch.tanh(p["x"][:, step] @ p["Wx"] + h @ p["Wh"] + p["b"])
        out.append(h)
    (torch.stack(out, 1) * t["target"]).sum().backward()
    return {n: v.grad for n, v in p.items()}


@pytest.mark.parametrize("forward", [RNN_FILL, RNN_LIST], ids=["fill", "list"])
def test_a_vanilla_rnn_through_time_in_both_forward_idioms(client, forward):
    body = post(client, RNN_INPUTS, forward, RNN_BACKWARD)
    assert_all_close(body, ["hs", "Wx", "Wh", "b", "x"])
    want = rnn_autograd()
    for name in ("Wx", "Wh", "b", "x"):
        assert body["gradients"][name]["stats"]["norm"] == pytest.approx(
            float(want[name].norm()), rel=1e-9
        )
    loop = next(e for e in body["forward"] if e["code"].startswith("h = torch.tanh"))
    assert loop["runs"] == 5
    # h is checked as its value after the loop: the last step's
    assert rows(body)["h"]["written"] is False
    assert body["tensors"]["h"]["shape"] == [3, 6]


@pytest.mark.parametrize(
    "old, new, tensor",
    [
        ("dWh += prev[:, t].T @ da", "dWh = prev[:, t].T @ da", "Wh"),  # = where += sums steps
        ("dh_t = dhs[:, t] + dnext", "dh_t = dhs[:, t]", "Wh"),  # BPTT without the next step
    ],
)
def test_rnn_slips_are_flagged(client, old, new, tensor):
    body = post(client, RNN_INPUTS, RNN_FILL, slip(RNN_BACKWARD, old, new))
    assert not rows(body)[tensor]["allclose"] and rows(body)["hs"]["allclose"]


# --------------------------------------------------------------------------- Python and lists


def test_split_chunk_cat_len_and_whole_number_arithmetic(client):
    inputs = {"x": {"shape": [4, 6]}, "W": {"shape": [6, 9]}}
    forward = """\
C = W.shape[1] // 3
q, k, v = (x @ W).split(C, dim=1)
a, c = x.chunk(2, 1)
parts = [q * k, v, a[:, ::2]]
y = torch.cat(parts, 1)
n = len(parts) + len(y) % 3
loss = y.sum() * n + c[range(0, 4, 2)].sum()
"""
    backward = """\
dy = torch.ones(4, 8) * n
dq = dy[:, :3] * k
dk = dy[:, :3] * q
dv = dy[:, 3:6]
dW = x.T @ torch.cat([dq, dk, dv], 1)
dx = torch.cat([dq, dk, dv], 1) @ W.T
dx[:, 0:3:2] += dy[:, 6:8]
dx[0:4:2, 3:] += 1.0
"""
    body = post(client, inputs, forward, backward)
    assert_all_close(body, ["y", "q", "k", "v", "W", "x"])
    assert body["tensors"]["y"]["shape"] == [4, 8]


def test_argmax_and_int_comparisons(client):
    inputs = {"x": {"shape": [5, 4]}, "ids": {"value": [0, 3, 3, 1, 2]}}
    forward = """\
top = x.argmax(1)
hit = (top == ids).float()
big = (ids >= 2).float()
loss = (x.amax((0, 1)) + x * (hit + big).unsqueeze(1)).sum()
"""
    backward = """\
dx = torch.zeros_like(x) + (hit + big).unsqueeze(1)
at = (x == x.amax((0, 1))).float()
dx += at * 20
"""
    assert_all_close(post(client, inputs, forward, backward), ["x"])


# --------------------------------------------------------------------------- export

EXPORT_FORWARD = RNN_LIST.replace(
    "hs = torch.stack(steps, 1)", "hs = F.dropout(torch.stack(steps, 1), 0.2)"
)
EXPORT_BACKWARD = RNN_BACKWARD.replace(
    "dhs = target", "kept = (hs != 0) / 0.8\ndhs = target\nds = dhs * kept"
).replace("prev = torch.cat([torch.zeros(B, 1, H), hs[:, :-1]], 1)",
          "hh = torch.stack(steps, 1)\nprev = torch.cat([torch.zeros(B, 1, H), hh[:, :-1]], 1)").replace(
    "dh_t = dhs[:, t] + dnext", "dh_t = ds[:, t] + dnext").replace(
    "(1 - hs[:, t] ** 2)", "(1 - hh[:, t] ** 2)")  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_an_exported_rnn_with_dropout_runs_the_same_program_in_plain_pytorch(
    client, tmp_path, dtype
):
    request = {"inputs": RNN_INPUTS, "forward": EXPORT_FORWARD, "backward": EXPORT_BACKWARD,
               "dtype": dtype}  # fmt: skip
    server = post(client, RNN_INPUTS, EXPORT_FORWARD, EXPORT_BACKWARD, dtype)
    assert_all_close(server, ["hs", "Wx", "Wh", "b", "x"])
    r = client.post("/api/export", json={"program": request, "format": "py"})
    assert r.status_code == 200, r.text[:300]
    path = tmp_path / "program.py"
    path.write_text(r.text)
    done = run_script([path], timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"loss {server['loss']}" in done.stdout


def test_nanogpt_scales_attention_with_math_sqrt(client):
    forward = GPT_FORWARD.replace("* hs ** -0.5", "* (1.0 / math.sqrt(k.size(-1)))")
    assert forward != GPT_FORWARD
    assert_all_close(post(client, GPT_INPUTS, forward, GPT_BACKWARD), GPT_GRADS)
    r = client.post("/api/program", json={"inputs": GPT_INPUTS, "forward": forward,
                                          "backward": "dx = math.sqrt(x)"})  # fmt: skip
    assert r.status_code == 422 and "takes a number" in r.json()["detail"][0]["msg"]


def test_the_readmes_rnn_example_checks_all_close(client):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text.split("#### Beyond the MLP", 1)[1], re.S)[1]
    forward, backward = (
        re.search(f'{n} = """\\n(.*?)"""', code, re.S)[1] for n in ("forward", "backward")
    )
    assert_all_close(post(client, RNN_INPUTS, forward, backward), ["hs", "Wx", "Wh", "b", "x"])
    wrong = post(client, RNN_INPUTS, forward, backward.replace("dWh += prev", "dWh = prev"))
    assert not rows(wrong)["Wh"]["allclose"] and rows(wrong)["Wx"]["allclose"]
