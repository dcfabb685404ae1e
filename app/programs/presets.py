"""Worked programs (GET /api/programs): each a complete POST /api/program body whose backward
is the solution, so each checks all-close. Written for Broadprop from the maths of each
network, in the style its course uses (the article's `.g` names, makemore's `d<name>`,
CS231n's `dscores`)."""

from __future__ import annotations

from typing import Any

ARTICLE_FORWARD = """\
l1 = x @ w1 + b1
a1 = l1.clamp_min(0.0)
out = a1 @ w2 + b2
loss = (out.squeeze(-1) - target).pow(2).mean()
"""

# the article's backward: the mse's, then each linear layer's three broadcasts, relu's mask
ARTICLE_BACKWARD = """\
out.g = 2.0 * (out.squeeze(-1) - target).unsqueeze(-1) / x.shape[0]
a1.g = (out.g.unsqueeze(1) * w2).sum(-1)
w2.g = (a1.unsqueeze(-1) * out.g.unsqueeze(1)).sum(0)
b2.g = out.g.sum(0)
l1.g = (l1 > 0).float() * a1.g
x.g = (l1.g.unsqueeze(1) * w1).sum(-1)
w1.g = (x.unsqueeze(-1) * l1.g.unsqueeze(1)).sum(0)
b1.g = l1.g.sum(0)
"""

# makemore-style character MLP, every step of batchnorm and cross-entropy named
MAKEMORE_FORWARD = """\
emb = C[Xb]
embcat = emb.view(emb.shape[0], -1)
hprebn = embcat @ W1 + b1
bnmeani = hprebn.sum(0, keepdim=True) / n
bndiff = hprebn - bnmeani
bndiff2 = bndiff ** 2
bnvar = bndiff2.sum(0, keepdim=True) / (n - 1)
bnvar_inv = (bnvar + 1e-5) ** -0.5
bnraw = bndiff * bnvar_inv
hpreact = bngain * bnraw + bnbias
h = torch.tanh(hpreact)
logits = h @ W2 + b2
logit_maxes = logits.max(1, keepdim=True).values
norm_logits = logits - logit_maxes
counts = norm_logits.exp()
counts_sum = counts.sum(1, keepdim=True)
counts_sum_inv = counts_sum ** -1
probs = counts * counts_sum_inv
logprobs = probs.log()
loss = -logprobs[range(n), Yb].mean()
"""

MAKEMORE_BACKWARD = """\
# the loss picks one log-probability per row and averages them
dlogprobs = torch.zeros_like(logprobs)
dlogprobs[range(n), Yb] = -1.0 / n
dprobs = dlogprobs / probs
# probs = counts * counts_sum_inv: counts_sum_inv is broadcast along each row
dcounts_sum_inv = (counts * dprobs).sum(1, keepdim=True)
dcounts = counts_sum_inv * dprobs
dcounts_sum = -counts_sum ** -2 * dcounts_sum_inv
# counts is used twice (probs and counts_sum): its gradient has two parts
dcounts += torch.ones_like(counts) * dcounts_sum
dnorm_logits = counts * dcounts
dlogits = dnorm_logits.clone()
dlogit_maxes = -dnorm_logits.sum(1, keepdim=True)
dlogits += F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]) * dlogit_maxes
# second linear layer
dh = dlogits @ W2.T
dW2 = h.T @ dlogits
db2 = dlogits.sum(0)
# tanh's derivative, from its output
dhpreact = (1.0 - h ** 2) * dh
# batchnorm, one step at a time
dbngain = (bnraw * dhpreact).sum(0, keepdim=True)
dbnraw = bngain * dhpreact
dbnbias = dhpreact.sum(0, keepdim=True)
dbndiff = bnvar_inv * dbnraw
dbnvar_inv = (bndiff * dbnraw).sum(0, keepdim=True)
dbnvar = -0.5 * (bnvar + 1e-5) ** -1.5 * dbnvar_inv
dbndiff2 = torch.ones_like(bndiff2) * dbnvar / (n - 1)
dbndiff += 2 * bndiff * dbndiff2
dhprebn = dbndiff.clone()
dbnmeani = -dbndiff.sum(0, keepdim=True)
dhprebn += torch.ones_like(hprebn) * dbnmeani / n
# first linear layer
dembcat = dhprebn @ W1.T
dW1 = embcat.T @ dhprebn
db1 = dhprebn.sum(0)
demb = dembcat.view(emb.shape)
# the embedding: each row of C gets every gradient of the places it was picked
dC = torch.zeros_like(C)
for k in range(Xb.shape[0]):
    for j in range(Xb.shape[1]):
        dC[Xb[k, j]] += demb[k, j]
"""

CS231N_FORWARD = """\
hidden_pre = X @ W1 + b1
hidden = hidden_pre.clamp(min=0)
scores = hidden @ W2 + b2
shifted = scores - scores.max(1, keepdim=True).values
probs = shifted.exp() / shifted.exp().sum(1, keepdim=True)
data_loss = -probs[range(N), y].log().mean()
reg_loss = reg * ((W1 * W1).sum() + (W2 * W2).sum())
loss = data_loss + reg_loss
"""

CS231N_BACKWARD = """\
dscores = probs.clone()
dscores[range(N), y] -= 1
dscores /= N
dW2 = hidden.T @ dscores + 2 * reg * W2
db2 = dscores.sum(0)
dhidden = dscores @ W2.T
# the ReLU passes the gradient where it let the value through
dhidden_pre = dhidden.clone()
dhidden_pre[hidden_pre <= 0] = 0
dW1 = X.T @ dhidden_pre + 2 * reg * W1
db1 = dhidden_pre.sum(0)
"""


def _article() -> dict[str, Any]:
    return {
        "inputs": {
            "x": {"shape": [1000, 784], "grad": True},
            "target": {"shape": [1000], "grad": False},
            "w1": {"shape": [784, 50]},
            "b1": {"shape": [50]},
            "w2": {"shape": [50, 1]},
            "b2": {"shape": [1]},
        },
        "forward": ARTICLE_FORWARD,
        "backward": ARTICLE_BACKWARD,
    }


def _makemore(block_size: int = 3, n: int = 32, emb: int = 10, hidden: int = 64) -> dict[str, Any]:
    vocab = 27
    fan_in = emb * block_size
    return {
        "inputs": {
            "Xb": {"data": "names", "field": "X", "block_size": block_size, "rows": n},
            "Yb": {"data": "names", "field": "Y", "block_size": block_size, "rows": n},
            "n": {"value": n},
            "C": {"shape": [vocab, emb]},
            # kaiming-style scales for tanh (5/3 / sqrt(fan_in)); small, non-zero biases so
            # every gradient is exercised
            "W1": {"shape": [fan_in, hidden], "scale": (5 / 3) / fan_in**0.5},
            "b1": {"shape": [hidden], "scale": 0.1},
            "W2": {"shape": [hidden, vocab], "scale": 0.1},
            "b2": {"shape": [vocab], "scale": 0.1},
            "bngain": {"shape": [1, hidden], "scale": 0.1, "offset": 1.0},
            "bnbias": {"shape": [1, hidden], "scale": 0.1},
        },
        "forward": MAKEMORE_FORWARD,
        "backward": MAKEMORE_BACKWARD,
    }


def _cs231n(n: int = 64, d: int = 32, hidden: int = 50, classes: int = 10) -> dict[str, Any]:
    return {
        "inputs": {
            "X": {"shape": [n, d], "grad": False},
            "y": {"shape": [n], "init": "randint", "high": classes},
            "N": {"value": n},
            "reg": {"value": 0.05},
            "W1": {"shape": [d, hidden], "scale": 0.1},
            "b1": {"shape": [hidden], "scale": 0.1},
            "W2": {"shape": [hidden, classes], "scale": 0.1},
            "b2": {"shape": [classes], "scale": 0.1},
        },
        "forward": CS231N_FORWARD,
        "backward": CS231N_BACKWARD,
    }


# --------------------------------------------------------------------------- the new chapters
# (v4): a GPT block, a conv net and an RNN, each with its backward worked from the maths

# one transformer block on names, nanoGPT's shapes: every position predicts the next character
GPT_FORWARD = """\
B, T = Xb.shape
V, C = wte.shape
nh = 4                                             # heads
hs = C // nh                                       # head size
tok = F.embedding(Xb, wte)                         # (B, T, C) token embeddings
pos = F.embedding(torch.arange(T), wpe)            # (T, C) position embeddings
x = tok + pos                                      # (B, T, C)
xn = F.layer_norm(x, (C,), ln1_g, ln1_b)
q = (xn @ Wq).view(B, T, nh, hs).transpose(1, 2)   # (B, nh, T, hs)
k = (xn @ Wk).view(B, T, nh, hs).transpose(1, 2)   # (B, nh, T, hs)
v = (xn @ Wv).view(B, T, nh, hs).transpose(1, 2)   # (B, nh, T, hs)
mask = torch.tril(torch.ones(T, T))                # a position sees itself and the past
att = (q @ k.transpose(-2, -1)) * hs ** -0.5       # (B, nh, T, T)
att = att.masked_fill(mask == 0, float('-inf'))
p = F.softmax(att, dim=-1)                         # (B, nh, T, T), 0 above the diagonal
y = (p @ v).transpose(1, 2).reshape(B, T, C)       # the heads side by side
a = y @ Wo + bo                                    # (B, T, C)
x1 = x + a                                         # residual
xn2 = F.layer_norm(x1, (C,), ln2_g, ln2_b)
hpre = xn2 @ W1 + b1                               # (B, T, 4C)
h = torch.relu(hpre)
m = h @ W2 + b2                                    # (B, T, C)
x2 = x1 + m                                        # residual
xf = F.layer_norm(x2, (C,), lnf_g, lnf_b)
logits = xf @ wte.T                                # (B, T, V): the head is the token embedding
loss = F.cross_entropy(logits.view(B * T, V), Yb.view(B * T))
"""

GPT_BACKWARD = """\
# cross-entropy at every position: softmax minus one-hot, averaged over the B*T positions
dlogits = (F.softmax(logits, -1) - F.one_hot(Yb, num_classes=V)) / (B * T)
# the tied head: wte's gradient has two parts, this one and the lookup's (at the end)
dxf = dlogits @ wte                                # (B, T, C)
dwte = dlogits.view(B * T, V).T @ xf.view(B * T, C)
# final layernorm: xhat = (x2 - mean) / sqrt(var + eps), then * g + b
mu = x2.mean(-1, keepdim=True)
rstd = (x2.var(-1, keepdim=True, unbiased=False) + 1e-5) ** -0.5
xhat = (x2 - mu) * rstd
dlnf_g = (dxf * xhat).sum((0, 1))
dlnf_b = dxf.sum((0, 1))
dxhat = dxf * lnf_g
dx2 = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
# residual x2 = x1 + m: the gradient flows into both branches unchanged
dm = dx2.clone()
dx1 = dx2.clone()
# the MLP
dh = dm @ W2.T
dW2 = h.view(B * T, -1).T @ dm.view(B * T, C)
db2 = dm.sum((0, 1))
dhpre = dh * (hpre > 0)
dxn2 = dhpre @ W1.T
dW1 = xn2.view(B * T, C).T @ dhpre.view(B * T, -1)
db1 = dhpre.sum((0, 1))
# second layernorm, into the residual stream's second part
mu = x1.mean(-1, keepdim=True)
rstd = (x1.var(-1, keepdim=True, unbiased=False) + 1e-5) ** -0.5
xhat = (x1 - mu) * rstd
dln2_g = (dxn2 * xhat).sum((0, 1))
dln2_b = dxn2.sum((0, 1))
dxhat = dxn2 * ln2_g
dx1 += rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
# residual x1 = x + a
da = dx1.clone()
dx = dx1.clone()
# the attention's output projection
dy = da @ Wo.T
dWo = y.view(B * T, C).T @ da.view(B * T, C)
dbo = da.sum((0, 1))
# attention: y = p @ v per head; softmax's backward row by row; masked entries have p = 0
dyh = dy.view(B, T, nh, hs).transpose(1, 2)        # (B, nh, T, hs)
dp = dyh @ v.transpose(-2, -1)
dv = p.transpose(-2, -1) @ dyh
datt = p * (dp - (p * dp).sum(-1, keepdim=True))
dq = (datt @ k) * hs ** -0.5
dk = (datt.transpose(-2, -1) @ q) * hs ** -0.5
# the heads back side by side: (B, nh, T, hs) -> (B*T, C)
dq2 = dq.transpose(1, 2).reshape(B * T, C)
dk2 = dk.transpose(1, 2).reshape(B * T, C)
dv2 = dv.transpose(1, 2).reshape(B * T, C)
dWq = xn.view(B * T, C).T @ dq2
dWk = xn.view(B * T, C).T @ dk2
dWv = xn.view(B * T, C).T @ dv2
dxn = (dq2 @ Wq.T + dk2 @ Wk.T + dv2 @ Wv.T).view(B, T, C)
# first layernorm
mu = x.mean(-1, keepdim=True)
rstd = (x.var(-1, keepdim=True, unbiased=False) + 1e-5) ** -0.5
xhat = (x - mu) * rstd
dln1_g = (dxn * xhat).sum((0, 1))
dln1_b = dxn.sum((0, 1))
dxhat = dxn * ln1_g
dx += rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
# the embeddings: every position of every sequence adds into its row
dtok = dx.clone()
dpos = dx.sum(0)
dwpe = dpos.clone()                                # position t is row t, once per sequence
dwte.index_add_(0, Xb.view(-1), dtok.view(B * T, C))
"""

# CS231n's conv layer through im2col (F.unfold), relu, 2x2 max-pool, an affine head, softmax
CONV_FORWARD = """\
N = X.shape[0]
K = w.shape[0]                                     # filters
H, W = X.shape[2], X.shape[3]
cols = F.unfold(X, 3, padding=1)                   # (N, 1*3*3, H*W): every 3x3 patch a column
out = (w.view(K, -1) @ cols).view(N, K, H, W) + b.view(1, K, 1, 1)
r = out.relu()
pooled, idx = F.max_pool2d(r, 2, return_indices=True)    # (N, K, H/2, W/2)
flat = pooled.view(N, -1)
scores = flat @ W2 + b2                            # (N, 10)
loss = F.cross_entropy(scores, y)
"""

CONV_BACKWARD = """\
# softmax loss: the probabilities, minus one at the right class, over N
dscores = F.softmax(scores, 1)
dscores[range(N), y] -= 1
dscores /= N
dW2 = flat.T @ dscores
db2 = dscores.sum(0)
dflat = dscores @ W2.T
dpooled = dflat.view(pooled.shape)
# max-pool: each window's gradient goes back to the one place its max came from
dr = torch.zeros_like(r).view(N, K, -1)
dr.scatter_add_(2, idx.view(N, K, -1), dpooled.view(N, K, -1))
dr = dr.view(N, K, H, W)
# relu lets the gradient through where it let the value through
dout = dr * (out > 0)
db = dout.sum((0, 2, 3))
# out = w @ cols: each filter's gradient sums its patches times the upstream gradient
dw = (dout.view(N, K, -1) @ cols.transpose(1, 2)).sum(0).view(w.shape)
"""

# a vanilla tanh RNN through time (min-char-rnn's maths), every position predicting the next
RNN_FORWARD = """\
B, T = Xb.shape
V, E = Cemb.shape
Hd = Whh.shape[0]
emb = Cemb[Xb]                                     # (B, T, E)
h = torch.zeros(B, Hd)
hs = torch.zeros(B, T, Hd)
for t in range(T):
    h = torch.tanh(emb[:, t] @ Wxh + h @ Whh + bh)
    hs[:, t] = h
logits = hs @ Why + by                             # (B, T, V)
loss = F.cross_entropy(logits.view(B * T, V), Yb.view(B * T))
"""

RNN_BACKWARD = """\
# cross-entropy at every position: softmax minus one-hot, averaged over the B*T positions
dlogits = (F.softmax(logits, -1) - F.one_hot(Yb, num_classes=V)) / (B * T)
dWhy = hs.view(B * T, Hd).T @ dlogits.view(B * T, V)
dby = dlogits.sum((0, 1))
dhs = dlogits @ Why.T                              # (B, T, Hd)
dh = dhs[:, -1]                                    # h after the loop is the last step's
# back through time: h_t feeds the output at t and the next step's h
prev = torch.cat([torch.zeros(B, 1, Hd), hs[:, :-1]], 1)     # h_{t-1} for every t
dWxh = torch.zeros_like(Wxh)
dWhh = torch.zeros_like(Whh)
dbh = torch.zeros_like(bh)
demb = torch.zeros_like(emb)
dhnext = torch.zeros(B, Hd)
for t in reversed(range(T)):
    dh_t = dhs[:, t] + dhnext
    dhraw = (1 - hs[:, t] ** 2) * dh_t             # through tanh
    dWxh += emb[:, t].T @ dhraw
    dWhh += prev[:, t].T @ dhraw
    dbh += dhraw.sum(0)
    demb[:, t] = dhraw @ Wxh.T
    dhnext = dhraw @ Whh.T
# the embedding: each row of Cemb gets every gradient of the places it was picked
dCemb = torch.zeros_like(Cemb)
dCemb.index_add_(0, Xb.view(-1), demb.view(B * T, E))
"""


def _names_inputs(block_size: int, rows: int, sequence: bool) -> dict[str, Any]:
    target = "Yseq" if sequence else "Y"
    return {
        "Xb": {"data": "names", "field": "X", "block_size": block_size, "rows": rows},
        "Yb": {"data": "names", "field": target, "block_size": block_size, "rows": rows},
    }


def _gpt(block_size: int = 8, n: int = 32, C: int = 32) -> dict[str, Any]:
    vocab = 27
    ln = {"shape": [C], "scale": 0.1, "offset": 1.0}  # gains near 1, biases near 0: every
    bias = {"shape": [C], "scale": 0.1}  # gradient exercised from the first step
    return {
        "inputs": {
            **_names_inputs(block_size, n, True),
            "wte": {"shape": [vocab, C], "scale": 0.1},
            "wpe": {"shape": [block_size, C], "scale": 0.1},
            "ln1_g": ln,
            "ln1_b": bias,
            "Wq": {"shape": [C, C], "scale": C**-0.5},
            "Wk": {"shape": [C, C], "scale": C**-0.5},
            "Wv": {"shape": [C, C], "scale": C**-0.5},
            "Wo": {"shape": [C, C], "scale": 0.5 * C**-0.5},
            "bo": bias,
            "ln2_g": ln,
            "ln2_b": bias,
            "W1": {"shape": [C, 4 * C], "scale": C**-0.5},
            "b1": {"shape": [4 * C], "scale": 0.1},
            "W2": {"shape": [4 * C, C], "scale": 0.5 * (4 * C) ** -0.5},
            "b2": bias,
            "lnf_g": ln,
            "lnf_b": bias,
        },  # fmt: skip
        "forward": GPT_FORWARD,
        "backward": GPT_BACKWARD,
    }


def _conv(n: int = 16, filters: int = 8) -> dict[str, Any]:
    return {
        "inputs": {
            "X": {"data": "mnist", "field": "X", "rows": n},
            "y": {"data": "mnist", "field": "Y", "rows": n},
            "w": {"shape": [filters, 1, 3, 3], "scale": (2 / 9) ** 0.5},  # kaiming: fan-in 9
            "b": {"shape": [filters], "scale": 0.1},
            "W2": {"shape": [filters * 14 * 14, 10], "scale": (filters * 196) ** -0.5},
            "b2": {"shape": [10], "scale": 0.1},
        },
        "forward": CONV_FORWARD,
        "backward": CONV_BACKWARD,
    }


def _rnn(block_size: int = 8, n: int = 32, emb: int = 16, hidden: int = 64) -> dict[str, Any]:
    vocab = 27
    return {
        "inputs": {
            **_names_inputs(block_size, n, True),
            "Cemb": {"shape": [vocab, emb]},
            "Wxh": {"shape": [emb, hidden], "scale": emb**-0.5},
            "Whh": {"shape": [hidden, hidden], "scale": 0.5 * hidden**-0.5},
            "bh": {"shape": [hidden], "scale": 0.1},
            "Why": {"shape": [hidden, vocab], "scale": 0.1 * hidden**-0.5},
            "by": {"shape": [vocab], "scale": 0.1},
        },
        "forward": RNN_FORWARD,
        "backward": RNN_BACKWARD,
    }


PRESETS = [
    {
        "id": "article",
        "title": "The article's net: x @ w1 + b1 -> relu -> @ w2 + b2 -> mse, its "
        "gradients written with broadcasting",
        "source": "the seed article (fast.ai 'from the foundations' style), .g names",
        "request": _article(),
    },
    {
        "id": "makemore",
        "title": "A character-level MLP on names: embedding, linear, batchnorm step by step, "
        "tanh, linear, cross-entropy step by step",
        "source": "in the manner of makemore part 4 ('becoming a backprop ninja'), exercise 1",
        "request": _makemore(),
    },
    {
        "id": "cs231n",
        "title": "A two-layer net with a softmax loss and L2 regularization",
        "source": "in the manner of CS231n's two-layer net assignment",
        "request": _cs231n(),
    },
    {
        "id": "gpt",
        "title": "One transformer block on names: token and position embeddings, layernorm, "
        "causal multi-head self-attention, residuals, an MLP, a head tied to the embedding",
        "source": "in the manner of nanoGPT and makemore's later parts; written from the maths",
        "request": _gpt(),
        "train": {"steps": 2000, "lr": 0.5, "batch": 32, "seed": 0},
    },
    {
        "id": "conv",
        "title": "A conv net on MNIST: a 3x3 conv layer through F.unfold, relu, 2x2 max-pool, "
        "a linear head, softmax loss",
        "source": "in the manner of CS231n's convolutional networks assignment (im2col)",
        "request": _conv(),
        "train": {"steps": 500, "lr": 0.1, "batch": 32, "seed": 0},
    },
    {
        "id": "rnn",
        "title": "A vanilla tanh RNN through time on names, every position predicting the "
        "next character",
        "source": "in the manner of min-char-rnn and CS231n's RNN assignment",
        "request": _rnn(),
        "train": {"steps": 2000, "lr": 0.5, "batch": 32, "seed": 0},
    },
]


def preset(preset_id: str) -> dict[str, Any] | None:
    return next((p for p in PRESETS if p["id"] == preset_id), None)
