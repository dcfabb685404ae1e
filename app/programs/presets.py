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
]


def preset(preset_id: str) -> dict[str, Any] | None:
    return next((p for p in PRESETS if p["id"] == preset_id), None)
