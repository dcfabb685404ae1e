"""The new chapters' training step (issue 31): the learner's backward through Broadprop's
interpreter against the same step in a plain PyTorch script with autograd, side by side.

    .venv/bin/python benchmarks/chapters_bench.py [--steps 200] [--repeat 3] [--full]
                                                  [--presets gpt conv rnn]

For each preset (gpt, conv, rnn), in this one process and with one torch thread (a training
worker's), on the same minibatches from the same starting weights:
- broadprop: `Trainer.step()` (the forward and the learner's backward, both read by the
  interpreter, no autograd) and the SGD update, as POST /api/program/train runs them;
- autograd:  the same network written in plain torch, `loss.backward()`, the same SGD update.
The two alternate `--repeat` times and each keeps its best (the machine may be shared).
Printed: ms per step each, their ratio, and both losses after the steps (they agree: the
learner's backward is the preset's worked one). `--full` also trains each preset with its
`train` defaults, as the endpoint would, and prints the first and last losses and the time.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.programs import presets  # noqa: E402
from app.programs import train as training  # noqa: E402
from app.programs.run import admit  # noqa: E402
from app.programs.schemas import ProgramRequest  # noqa: E402


def gpt(p: dict, d: dict) -> torch.Tensor:
    Xb, Yb = d["Xb"], d["Yb"]
    B, T = Xb.shape
    V, C = p["wte"].shape
    nh, hs = 4, C // 4
    x = F.embedding(Xb, p["wte"]) + F.embedding(torch.arange(T), p["wpe"])
    xn = F.layer_norm(x, (C,), p["ln1_g"], p["ln1_b"])
    q, k, v = ((xn @ p[w]).view(B, T, nh, hs).transpose(1, 2) for w in ("Wq", "Wk", "Wv"))
    att = (q @ k.transpose(-2, -1)) * hs**-0.5
    att = att.masked_fill(torch.tril(torch.ones(T, T)) == 0, float("-inf"))
    y = (F.softmax(att, dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
    x1 = x + y @ p["Wo"] + p["bo"]
    h = torch.relu(F.layer_norm(x1, (C,), p["ln2_g"], p["ln2_b"]) @ p["W1"] + p["b1"])
    x2 = x1 + h @ p["W2"] + p["b2"]
    logits = F.layer_norm(x2, (C,), p["lnf_g"], p["lnf_b"]) @ p["wte"].T
    return F.cross_entropy(logits.view(B * T, V), Yb.view(B * T))


def conv(p: dict, d: dict) -> torch.Tensor:
    X = d["X"]
    N = X.shape[0]
    out = F.conv2d(X, p["w"], p["b"], padding=1)
    flat = F.max_pool2d(out.relu(), 2).view(N, -1)
    return F.cross_entropy(flat @ p["W2"] + p["b2"], d["y"])


def rnn(p: dict, d: dict) -> torch.Tensor:
    Xb, Yb = d["Xb"], d["Yb"]
    B, T = Xb.shape
    emb = p["Cemb"][Xb]
    h = torch.zeros(B, p["Whh"].shape[0])
    hs = []
    for t in range(T):
        h = torch.tanh(emb[:, t] @ p["Wxh"] + h @ p["Whh"] + p["bh"])
        hs.append(h)
    logits = torch.stack(hs, 1) @ p["Why"] + p["by"]
    return F.cross_entropy(logits.view(B * T, -1), Yb.view(B * T))


PLAIN = {"gpt": gpt, "conv": conv, "rnn": rnn}


def setup_of(preset_id: str, steps: int) -> training.Setup:
    entry = presets.preset(preset_id)
    t = entry["train"]
    return training.prepare(
        ProgramRequest(**entry["request"]), steps=steps, batch=t["batch"], lr=t["lr"],
        seed=t["seed"], eval_every=None, report_every=None,
        admit=lambda r: admit(r, 1 << 30, 10.0),
    )  # fmt: skip


def batches(setup: training.Setup, steps: int) -> list[dict]:
    trainer = training.Trainer(setup, lambda: None)
    return [trainer.minibatch() for _ in range(steps)]


def broadprop(setup: training.Setup, data: list[dict]) -> tuple[float, float]:
    """(seconds per step, the last loss): the interpreter's step and the SGD update."""
    trainer = training.Trainer(setup, lambda: None)
    start = time.perf_counter()
    for made in data:
        trainer.minibatch = lambda made=made: made
        loss, grads, _ = trainer.step()
        for name, param in trainer.params.items():
            param.sub_(grads[name], alpha=setup.lr)
    return (time.perf_counter() - start) / len(data), loss


def autograd(setup: training.Setup, preset_id: str, data: list[dict]) -> tuple[float, float]:
    """(seconds per step, the last loss): the same network in plain torch, loss.backward()."""
    params = {n: p.clone().requires_grad_() for n, p in
              training.Trainer(setup, lambda: None).params.items()}  # fmt: skip
    forward = PLAIN[preset_id]
    start = time.perf_counter()
    for made in data:
        loss = forward(params, made)
        for p in params.values():
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for p in params.values():
                p.sub_(p.grad, alpha=setup.lr)
    return (time.perf_counter() - start) / len(data), loss.item()


def full(preset_id: str) -> None:
    """The preset trained with its `train` defaults, as POST /api/program/train runs it."""
    steps = presets.preset(preset_id)["train"]["steps"]
    setup = setup_of(preset_id, steps)
    first = last = None
    for kind, event in training.train(setup):
        if kind == "step" and first is None:
            first = event
        last = event
    accuracy = last.get("val_accuracy")
    extra = f" · val accuracy {accuracy:.3f}" if accuracy is not None else ""
    samples = f" · samples {', '.join(last['samples'][:6])}" if last.get("samples") else ""
    print(f"{preset_id:5s} full: {last['steps']} steps in {last['seconds']:.1f} s · loss "
          f"{first['loss']:.3f} (val {first['val_loss']:.3f}) -> train {last['train_loss']:.3f}, "
          f"val {last['val_loss']:.3f}{extra}{samples}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=list(PLAIN))
    parser.add_argument("--full", action="store_true", help="also train with the defaults")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a training worker's
    print(f"torch {torch.__version__}, 1 thread, {args.steps} steps, best of {args.repeat}")
    for preset_id in args.presets:
        setup = setup_of(preset_id, args.steps)
        data = batches(setup, args.steps)
        ours, theirs = math.inf, math.inf
        for _ in range(args.repeat):
            s, loss_ours = broadprop(setup, data)
            ours = min(ours, s)
            s, loss_theirs = autograd(setup, preset_id, data)
            theirs = min(theirs, s)
        print(f"{preset_id:5s} broadprop {ours * 1e3:7.2f} ms/step · autograd {theirs * 1e3:7.2f} "
              f"ms/step · ratio {ours / theirs:5.2f}x · last loss {loss_ours:.4f} vs "
              f"{loss_theirs:.4f}")  # fmt: skip
    if args.full:
        for preset_id in args.presets:
            full(preset_id)


if __name__ == "__main__":
    main()
