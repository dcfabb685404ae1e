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


def check_program(program, dtype, rerun, spelled, reads):
    """Run `program(dtype)` (-> loss, manual gradients, autograd's) and print the check; 1 when
    a written gradient differs from autograd, else 0. `rerun`: run it again in float64 to
    measure the rounding both sides carry. `spelled`: tensor -> the backward's name for its
    gradient; `reads`: tensor -> the gradients its lines read."""
    loss, manual, autograd = program(dtype)
    again = program(torch.float64) if rerun else None
    print(f"loss {loss}")
    sizes = tuple(sorted({d for t in autograd.values() for d in t.shape if d > 1}))
    failed, lines = [], []
    for name, got in manual.items():
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
        lines.append((name, f"{name:16s} exact: {str(exact):5s} approximate: "
                      f"{str(result['allclose']):5s} maxdiff: {result['max_abs_err']:.3e}", why))  # fmt: skip
    for name, line, why in lines:
        print(line)
        up = [d for d in reads.get(name, ()) if d in failed and d != name]
        if name in failed and up:  # the line reads a gradient that is already wrong
            print(f"    why: {spelled.get(name, name)} is computed from "
                  f"{spelled.get(up[-1], up[-1])}, which is already wrong: fix that first")  # fmt: skip
        elif why is not None:
            print(f"    why: {why['message']}")
    if failed:
        print("differs from autograd: " + ", ".join(failed))
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
    return X[pick], Y[pick]
