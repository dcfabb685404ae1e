"""A program as a file to take home: a script (or notebook) that needs only torch (and the
`names` package for names data), rebuilds the inputs exactly as the server made them, runs
the learner's forward under autograd and the learner's backward on detached copies, and
checks every written gradient cmp()-style. The script exits 0 exactly when every written
gradient matches.

The learner's lines are copied verbatim: they passed the allowlist, and every call they make
means in PyTorch what it meant on the server (app/lab/statements.py). They run inside the
function `program(DTYPE)`, app/export/frames.py's own source with the lines set in as data: in
the run's dtype, and again in float64 to measure the rounding both sides carry exactly where
the server reruns (`Plan.rerun`, app/programs/plan.py). The check itself is Broadprop's code, embedded: app/check/tolerance.py, the diagnosis's `explain`
and app/export/witness.py.
"""

from __future__ import annotations

import inspect
import json

from app.check import diagnosis, tolerance
from app.export import frames, witness
from app.export.lines import framed, module_body
from app.programs import run as programs
from app.programs.check import code_hint
from app.programs.diagnose import gradient_reads
from app.programs.schemas import ProgramRequest

# the diagnosis the file prints for a failing gradient: the hypotheses on G and R alone
# (scale, sign, transpose), as the server tests them; their source, as the run's file embeds
# the reference
DIAGNOSIS_FUNCTIONS = (diagnosis.name_factor, diagnosis._scale, diagnosis.explain)

# the file's last lines: the check, run as a script (its exit status) or in a notebook's cell
RUN_CHECK = "check_program(program, DTYPE, RERUN, SPELLED, READS, HINTS, LINES)"
SCRIPT_END = f'if __name__ == "__main__":\n    sys.exit({RUN_CHECK})'

MEDIA_TYPES = {"py": "text/x-python; charset=utf-8", "ipynb": "application/x-ipynb+json"}


def _inputs_code(req: ProgramRequest, has_grad: list[str]) -> list[str]:
    """The inputs, made as app/programs/inputs.py makes them, in the order given."""
    lines = []  # after the frame's generator `g`, seeded with req.seed
    for name, spec in req.inputs.items():
        if spec.data is not None:
            part = {"X": 0, "Y": 1, "Yseq": 2}[spec.field]
            if spec.data == "names":
                lines.append(
                    f"{name} = names_data({spec.block_size}, {spec.rows}, {req.seed})[{part}]"
                )
            elif part == 0:  # images: in the run's dtype, as the server makes them
                lines.append(f"{name} = digits_data({spec.data!r}, {spec.rows}, {req.seed})[0]"
                             ".to(RUN_DTYPE).to(DTYPE)")  # fmt: skip
            else:
                lines.append(f"{name} = digits_data({spec.data!r}, {spec.rows}, {req.seed})[1]")
        elif spec.value is not None:
            if not isinstance(spec.value, list):
                lines.append(f"{name} = {spec.value!r}")
            elif spec.integer:
                lines.append(f"{name} = torch.tensor({json.dumps(spec.value)}, dtype=torch.int64)")
            else:
                lines.append(f"{name} = torch.tensor({json.dumps(spec.value)}, "
                             "dtype=torch.float64).to(RUN_DTYPE).to(DTYPE)")  # fmt: skip
        elif spec.init == "randint":
            lines.append(f"{name} = torch.randint({spec.high}, {tuple(spec.shape)!r}, generator=g)")
        else:
            shape = ", ".join(map(str, spec.shape)) or "()"
            make = {
                None: f"torch.randn({shape}, generator=g)",
                "randn": f"torch.randn({shape}, generator=g)",
                "zeros": f"torch.zeros({shape})",
                "ones": f"torch.ones({shape})",
            }[spec.init]
            lines.append(f"{name} = ({make} * {float(spec.scale)!r} + {float(spec.offset)!r})"
                         ".to(RUN_DTYPE).to(DTYPE)")  # fmt: skip
    return lines


def script(req: ProgramRequest, plan: programs.Plan) -> str:
    """The program as a runnable Python script."""
    return "\n".join(f"{s['code']}\n" for s in sections(req, plan))


def sections(req: ProgramRequest, plan: programs.Plan) -> list[dict[str, str]]:
    """The file's parts, each a markdown note and its code (cells of the notebook)."""
    dtype = f"torch.{req.dtype}"
    written = _written(plan)
    inputs = _inputs_code(req, plan.has_grad)
    uses_names = any(s.data is not None for s in req.inputs.values())
    grad_inputs = [n for n in req.inputs if n in plan.has_grad]
    retain = [n for n in plan.has_grad if n not in req.inputs]
    # leading blank lines kept: the script's backward lines count as the server's do
    detach = [*req.inputs, *plan.intermediates]
    rerun_note = (
        "rerun in float64 to measure the rounding both sides carry, as the server does"
        if plan.rerun
        else "no float64 rerun, as on the server (" + ("already float64)" if req.dtype ==
              "float64" else "too long a program to run twice)")
    )  # fmt: skip
    header = f'''"""Broadprop program, exported: your forward under autograd, your backward by hand,
every gradient your backward writes checked against autograd (exit 0 when all match).
Needs torch{" and the names data set (pip install torch names)" if uses_names else " (pip install torch)"}."""
from __future__ import annotations

import itertools
import math  # the check's, and a program may scale by math.sqrt
import sys
from typing import Any

import torch
import torch.nn.functional as F

RUN_DTYPE = DTYPE = {dtype}
RERUN = {plan.rerun!r}  # {rerun_note}
'''
    body = framed(
        frames.program,
        SEED=str(req.seed),
        INPUTS=inputs,
        LEAVES=[f"{n} = {n}.to(DTYPE).requires_grad_()" for n in grad_inputs],
        FORWARD=req.forward.strip("\n").split("\n"),
        RETAIN=[f"{n}.retain_grad()" for n in retain],
        LOSS=req.loss,
        AUTOGRAD="{" + ", ".join(f"{n!r}: _grad({n})" for n in plan.has_grad) + "}",
        DETACH=[f"{n} = {n}.detach() if isinstance({n}, torch.Tensor) else {n}" for n in detach],
        BACKWARD=(req.backward.rstrip() or "pass").split("\n"),
        WRITTEN=repr(written),
    )
    check = f"\n\n{SCRIPT_END}\n"
    reads = {t: sorted(r) for t, r in gradient_reads(plan).items() if r}
    where = _lines(plan)
    hints = {t: h for t, s in written.items() if (h := code_hint(t, s, where.get(t, []), plan))}
    why = "\n".join(
        [
            "# why a gradient is wrong, from the numbers: Broadprop's own app/check/diagnosis.py",
            f"SPELLED = {written!r}  # in the page's order: as the backward finishes them",
            f"READS = {reads!r}  # the gradients each gradient's lines read",
            f"LINES = {where!r}  # the backward lines that write each gradient",
            f"HINTS = {hints!r}  # the page's hints read from the code, if the gradient fails",
            f"_FACTOR_STORIES = {diagnosis._FACTOR_STORIES!r}",
            *(inspect.getsource(f) for f in DIAGNOSIS_FUNCTIONS),
            "# the tolerance: Broadprop's own app/check/tolerance.py",
            *module_body(tolerance),
            "",
            "",
            "# the check: Broadprop's own app/export/witness.py",
            *module_body(witness),
        ]
    )
    return [
        {
            "note": "# A Broadprop program\nYour network, written as lines, checked by autograd.",
            "code": header,
        },  # fmt: skip
        {
            "note": "Inputs, your forward under autograd (every named tensor's gradient kept), "
            "then your backward by hand.",
            "code": "\n".join(body),
        },  # fmt: skip
        {
            "note": "Every gradient your backward wrote, against autograd's (float64 once more, "
            "to tell rounding from a real difference).",
            "code": why + "\n" + check,
        },  # fmt: skip
    ]


def _written(plan: programs.Plan) -> dict[str, str]:
    """tensor -> how the backward names its gradient (`dlogits`, `out.g`), for those the
    dry run saw written, in the page's order (app/programs/check.py: by the line that
    finishes each, then by name)."""
    out: dict[str, str] = {}
    for entry in plan.backward_lines.values():
        grad = entry.grad_of
        if grad is not None and grad not in out:
            # the target's name that spells this gradient (one of two, when unpacking)
            out[grad] = next(n for n in entry.target.split(", ") if n in (f"d{grad}", f"{grad}.g"))
    where = _lines(plan)
    return {t: out[t] for t in sorted(out, key=lambda t: (max(where.get(t, [10**9])), t))}


def _lines(plan: programs.Plan) -> dict[str, list[int]]:
    """tensor -> the backward lines that write its gradient (the dry run's)."""
    out: dict[str, list[int]] = {}
    for line, entry in sorted(plan.backward_lines.items()):
        if entry.grad_of is not None:
            out.setdefault(entry.grad_of, []).append(line)
    return out


def notebook(req: ProgramRequest, plan: programs.Plan) -> str:
    import nbformat  # here: jsonschema under it costs the server 23 MB and 1.5 s at start

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}  # fmt: skip
    parts = sections(req, plan)
    for part in parts:
        nb.cells.append(nbformat.v4.new_markdown_cell(part["note"]))
        code = part["code"].replace(SCRIPT_END, RUN_CHECK)
        nb.cells.append(nbformat.v4.new_code_cell(code.strip("\n")))
    nbformat.validate(nb)
    return nbformat.writes(nb)


def export(req: ProgramRequest, plan: programs.Plan, fmt: str) -> tuple[str, str]:
    text = script(req, plan) if fmt == "py" else notebook(req, plan)
    return text, f"broadprop_program.{fmt}"
