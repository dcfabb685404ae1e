"""The classic slips of the chapters after the MLP, named in the learner's words: attention
(the causal mask, softmax's axis, the `hs ** -0.5` scale), max-pool, backprop through time,
tied weights and repeated ids.

Each hint is read from the numbers (the written gradient `G` against autograd's `R`, with the
check's own tolerance `close`) and from the code (the forward line that made the tensor, the
backward lines that wrote its gradient). A hint is only asked for a gradient that fails the
check, and each one tests its slip precisely (the slipped gradient rebuilt from `R` and
compared with `G`, or the slip's form found in the code), so a correct backward never gets
one and an unrelated slip gets none of these.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F

from app.lab.hints import fmt_shape
from app.ops.traced import Traced
from app.programs.outcome import Outcome
from app.programs.plan import GRAD_PREFIX, GRAD_SUFFIX, Plan

Close = Callable[[torch.Tensor, torch.Tensor], bool]

# attributes and calls that read a tensor's shape, not its values (no gradient flows there)
SHAPE_ATTRS = frozenset({"shape", "ndim", "dtype", "device"})
SHAPE_METHODS = frozenset({"size", "dim", "numel"})


# --------------------------------------------------------------------------- the forward's uses


def tensor_uses(plan: Plan, name: str) -> list[int]:
    """The forward lines that read the tensor's checked value (its value after the last
    top-level statement that wrote it) through its numbers: not the lines before a rebinding
    (`att = att.masked_fill(...)` reads the earlier `att`), nor a line that only reads its
    shape (`V, C = wte.shape`). A gradient is the sum of what these lines send back."""
    if not plan.forward.body:  # a notebook's forward ran in the kernel: only its reads are known
        return list(plan.forward_reads.get(name, []))
    statements = _forward_names(plan)
    last_write = max((line for line, writes, _ in statements if name in writes), default=0)
    return [line for line, _, reads in statements if line > last_write and name in reads]


def _forward_names(plan: Plan) -> list[tuple[int, set[str], set[str]]]:
    """Each top-level forward statement's line, the names it writes and those whose numbers it
    reads: walked once per plan (a failing program's hints ask for every failing gradient's
    uses, each over every statement: two thirds of its answer's time, walked each time)."""
    if "forward_names" not in plan.answered:
        plan.answered["forward_names"] = [
            (s.lineno, _writes(s), _value_reads(s)) for s in plan.forward.body
        ]
    return plan.answered["forward_names"]


def _writes(stmt: ast.stmt) -> set[str]:
    """The names a top-level statement (a loop with everything in it) assigns or fills."""
    out: set[str] = set()
    for node in ast.walk(stmt):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.For)):
            targets = [node.target]
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            f = node.value.func  # `hs.index_add_(...)`: an in-place method writes its tensor
            if isinstance(f, ast.Attribute) and f.attr.endswith("_"):
                targets = [f.value]
        for t in targets:
            for sub in t.elts if isinstance(t, ast.Tuple) else [t]:
                while isinstance(sub, (ast.Subscript, ast.Attribute)):
                    sub = sub.value
                if isinstance(sub, ast.Name):
                    out.add(sub.id)
    return out


def _value_reads(stmt: ast.stmt) -> set[str]:
    """The names whose numbers the statement reads somewhere (not only their shape)."""
    root = stmt.value if isinstance(stmt, ast.Assign) else stmt
    shape_only: set[int] = set()
    for node in ast.walk(root):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.attr in SHAPE_ATTRS:
                shape_only.add(id(node.value))
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in SHAPE_METHODS:
                if isinstance(f.value, ast.Name):
                    shape_only.add(id(f.value))
            if isinstance(f, ast.Name) and f.id == "len" and node.args:
                if isinstance(node.args[0], ast.Name):
                    shape_only.add(id(node.args[0]))
    return {n.id for n in ast.walk(root) if isinstance(n, ast.Name) and id(n) not in shape_only}


def _statement(plan: Plan, line: int) -> ast.stmt | None:
    return next((s for s in plan.forward.body if s.lineno == line), None)


def _call_name(node: ast.AST) -> str:
    if not isinstance(node, ast.Call):
        return ""
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")


def _value(main: Outcome, name: str) -> torch.Tensor | None:
    v = main.forward.get(name, main.inputs.get(name))
    v = v.t if isinstance(v, Traced) else v
    return v if isinstance(v, torch.Tensor) else None


def _number(node: ast.expr | None, main: Outcome) -> float | None:
    """A constant, or a name the forward bound to a number (`hs`, `K`)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _number(node.operand, main)
        return None if inner is None else -inner
    if isinstance(node, ast.Name):
        v = main.forward.get(node.id, main.inputs.get(node.id))
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def _argument(call: ast.Call, position: int, keyword: str) -> ast.expr | None:
    for kw in call.keywords:
        if kw.arg == keyword:
            return kw.value
    return call.args[position] if len(call.args) > position else None


# --------------------------------------------------------------------------- from the numbers


def numbers_hint(
    name: str, G: torch.Tensor, R: torch.Tensor, plan: Plan, main: Outcome, close: Close
) -> str | None:
    """The chapters' slips that the numbers show, for a failing gradient of the same shape as
    autograd's: the first that explains `G`."""
    if tuple(G.shape) != tuple(R.shape) or not G.is_floating_point():
        return None
    spelled = main.spelling.get(name, GRAD_PREFIX + name)
    G, R = G.to(R.dtype), R
    for hint in (_mask_forgotten, _softmax_axis, _attention_scale, _pool_everywhere,
                 _repeated_ids):  # fmt: skip
        found = hint(name, spelled, G, R, plan, main, close)
        if found:
            return found
    return None


def _masked_fills(plan: Plan) -> list[tuple[ast.Assign, str, str]]:
    """`out = src.masked_fill(mask, float('-inf'))` lines: (statement, out, src)."""
    found = []
    for stmt in plan.forward.body:
        if not isinstance(stmt, ast.Assign) or not isinstance(stmt.targets[0], ast.Name):
            continue
        call = stmt.value
        if _call_name(call) != "masked_fill" or not isinstance(call.func, ast.Attribute):
            continue
        if not isinstance(call.func.value, ast.Name) or "inf" not in ast.unparse(call):
            continue
        found.append((stmt, stmt.targets[0].id, call.func.value.id))
    return found


def _mask_forgotten(name, spelled, G, R, plan, main, close) -> str | None:
    """Gradient where the causal mask put -inf: softmax gives those positions p = 0, so
    autograd's gradient there is exactly 0, and no other slip of softmax's backward puts
    any there (each is multiplied by p)."""
    for stmt, out, src in _masked_fills(plan):
        if name not in (out, src):
            continue
        masked = R == 0
        made = _value(main, out)
        if made is not None and tuple(made.shape) == tuple(G.shape):
            masked &= torch.isinf(made)
        scale = float(R.abs().max()) if R.numel() else 0.0
        leaked = masked & (G.abs() > 1e-6 * max(scale, 1e-30))
        if not bool(leaked.any()) or float(G[masked].abs().max()) < 1e-3 * scale:
            continue
        mask_src = ast.unparse(stmt.value.args[0]) if stmt.value.args else "mask == 0"
        if close(G.masked_fill(masked, 0), R):
            fix = (f"apply it there too: `{spelled} = {spelled}.masked_fill({mask_src}, 0)`, or "
                   "compute it from the masked p")  # fmt: skip
        else:
            fix = (
                "the other positions differ too: were the probabilities recomputed in the "
                "backward without the mask? Use the forward's masked p"
            )
        return (
            f"{spelled} has gradient at {int(leaked.sum()):,} masked positions (above the "
            f"diagonal), where line {stmt.lineno} set {out} to -inf: softmax gives them p = 0, "
            "so nothing flows back there and their gradient is 0. The causal mask belongs in "
            f"the backward as well; {fix}"
        )
    return None


def _softmaxes(plan: Plan, name: str) -> list[tuple[ast.Assign, str, int]]:
    """`p = F.softmax(name, dim=d)` / `name.softmax(d)` lines: (statement, p, d)."""
    found = []
    for stmt in plan.forward.body:
        if not isinstance(stmt, ast.Assign) or not isinstance(stmt.targets[0], ast.Name):
            continue
        call = stmt.value
        if _call_name(call) != "softmax" or not isinstance(call.func, ast.Attribute):
            continue
        method = not (
            isinstance(call.func.value, ast.Name) and call.func.value.id in ("F", "torch")
        )
        src = call.func.value if method else _argument(call, 0, "input")
        dim = _argument(call, 0 if method else 1, "dim")
        if not isinstance(src, ast.Name) or src.id != name:
            continue
        if isinstance(dim, ast.UnaryOp) and isinstance(dim.operand, ast.Constant):
            found.append((stmt, stmt.targets[0].id, -int(dim.operand.value)))
        elif isinstance(dim, ast.Constant) and isinstance(dim.value, int):
            found.append((stmt, stmt.targets[0].id, dim.value))
    return found


def _softmax_axis(name, spelled, G, R, plan, main, close) -> str | None:
    """softmax's backward `p * (dp - (p * dp).sum(d, keepdim=True))` summed over another dim
    than the softmax's: rebuilt from autograd's dp for every other d."""
    for stmt, p_name, dim in _softmaxes(plan, name):
        p, dp = _value(main, p_name), main.autograd.get(p_name)
        if p is None or dp is None or tuple(p.shape) != tuple(G.shape):
            continue
        p, dp = p.to(R.dtype), dp.to(R.dtype)
        want = dim % G.dim()
        for d in range(G.dim()):
            if d == want or G.shape[d] == 1:
                continue
            if close(G, p * (dp - (p * dp).sum(d, keepdim=True))):
                shown = d - G.dim()
                return (
                    f"{spelled} is softmax's backward summed over dim {shown}, but line "
                    f"{stmt.lineno} takes the softmax over dim {want - G.dim()}: the sum "
                    f"Σ p·d{p_name} runs along the softmax's own dim, one sum per row of "
                    f"probabilities: `{spelled} = {p_name} * (d{p_name} - ({p_name} * "
                    f"d{p_name}).sum({want - G.dim()}, keepdim=True))`"
                )
    return None


def _scale_of(G: torch.Tensor, R: torch.Tensor) -> float | None:
    g, r = G.double().reshape(-1), R.double().reshape(-1)
    rr = float((r * r).sum())
    return float((g * r).sum()) / rr if rr > 0 else None


def _attention_scale(name, spelled, G, R, plan, main, close) -> str | None:
    """`dq` without the `hs ** -0.5` that multiplies q @ k.T in the forward (or with it
    twice): G is R times sqrt(hs) (or 1/sqrt(hs))."""
    c = None
    for line in tensor_uses(plan, name):
        stmt = _statement(plan, line)
        if not isinstance(stmt, ast.Assign):
            continue
        for node in ast.walk(stmt.value):
            if not isinstance(node, ast.BinOp) or not isinstance(node.op, (ast.Mult, ast.Div)):
                continue
            sides = [(node.right, node.left)]
            if isinstance(node.op, ast.Mult):
                sides.append((node.left, node.right))
            for factor, scores in sides:
                s = _root_factor(factor, main)
                if s is None or not any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.MatMult)
                                        for n in ast.walk(scores)):  # fmt: skip
                    continue
                if isinstance(node.op, ast.Div):
                    s = 1 / s
                c = _scale_of(G, R) if c is None else c
                if c is None:
                    return None
                if abs(c * s - 1) < 1e-3 and close(G, R / s):
                    what = "is missing"
                elif abs(c / s - 1) < 1e-3 and close(G, R * s):
                    what = "is applied twice"
                else:
                    continue
                code = _shown(factor)
                return (
                    f"{spelled} is autograd's gradient times {c:.4g}: the attention scale "
                    f"`{code}` {what}. Line {line} scales {_shown(scores)} by it, and the chain "
                    f"rule carries that scale, once, into both dq and dk: "
                    f"`{spelled} = (...) {'*' if isinstance(node.op, ast.Mult) else '/'} {code}`"
                )
    return None


def _root_factor(node: ast.expr, main: Outcome) -> float | None:
    """The value of `hs ** -0.5`, `hs ** 0.5`, `math.sqrt(hs)`-like factors (a number's
    square root or its inverse), else None."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        base, exponent = _number(node.left, main), _number(node.right, main)
        if exponent in (0.5, -0.5) and base is not None and base > 1:
            return base**exponent
    if _call_name(node) == "sqrt" and len(node.args) == 1:
        base = _number(node.args[0], main)
        if base is not None and base > 1:
            return base**0.5
    return None


def _shown(node: ast.expr) -> str:
    """Code as the learner writes it (`hs ** -0.5`, not ast's `hs ** (-0.5)`)."""
    return re.sub(r"\*\* \((-[\d.]+)\)", r"** \1", ast.unparse(node))


def _pool_everywhere(name, spelled, G, R, plan, main, close) -> str | None:
    """max-pool's gradient spread over every entry of its window, not routed to the max."""
    if G.dim() != 4:
        return None
    for line in tensor_uses(plan, name):
        stmt = _statement(plan, line)
        call = stmt.value if isinstance(stmt, ast.Assign) else None
        if _call_name(call) != "max_pool2d":
            continue
        src = _argument(call, 0, "input")
        if not isinstance(src, ast.Name) or src.id != name:
            continue
        k = _number(_argument(call, 1, "kernel_size"), main)
        stride = _argument(call, 2, "stride")
        padding = _argument(call, 3, "padding")
        if k is None or (stride is not None and _number(stride, main) != k):
            continue
        if padding is not None and _number(padding, main) != 0:
            continue
        k = int(k)
        H, W = (G.shape[-2] // k) * k, (G.shape[-1] // k) * k
        window = F.avg_pool2d(R.double(), k) * (k * k)  # each window's gradient: dpooled
        spread = window.repeat_interleave(k, -2).repeat_interleave(k, -1)
        full = torch.zeros_like(R.double())
        full[..., :H, :W] = spread
        for H_, how in ((full, f"all {k * k} of its entries"),
                        (full / (k * k), f"its {k * k} entries in equal shares (avg-pool's "
                         "gradient)")):  # fmt: skip
            if close(G, H_.to(R.dtype)):
                return (
                    f"{spelled} sends each pooling window's gradient to {how}: max-pool "
                    f"(line {line}) passed on one entry per window, its max, so only that entry "
                    "gets the window's gradient and the other entries get 0. Route it to the "
                    "argmax: `F.max_pool2d(..., return_indices=True)`, then a `scatter_add_` of "
                    "the pooled gradient at those indices (or a mask of where each max was)"
                )
    return None


def _repeated_ids(name, spelled, G, R, plan, main, close) -> str | None:
    """`dW[ids] += dY` with ids that repeat: PyTorch keeps one write per index."""
    delta = main.dropped.get(name)
    if delta is None or tuple(delta.shape) != tuple(G.shape) or not bool(delta.ne(0).any()):
        return None
    if not close((G.double() + delta.double()).to(R.dtype), R):
        return None
    rows = int(delta.reshape(delta.shape[0], -1).ne(0).any(1).sum()) if delta.dim() else 1
    for ln in reversed(main.lines.get(name, [])):
        entry = plan.backward_lines.get(ln)
        stmt = _backward_statement(plan, ln)
        if entry is None or not isinstance(stmt, ast.AugAssign):
            continue
        if not isinstance(stmt.target, ast.Subscript) or not isinstance(stmt.op, ast.Add):
            continue
        base = ast.unparse(stmt.target.value)
        index = stmt.target.slice
        value = ast.unparse(stmt.value)
        if isinstance(index, ast.Tuple):
            fix = (f"`{base}.index_put_(({ast.unparse(index)[1:-1]},), {value}, "
                   "accumulate=True)`")  # fmt: skip
        else:
            tail = ", ".join(str(d) for d in G.shape[1:])
            fix = (f"`{base}.index_add_(0, {ast.unparse(index)}.view(-1), "
                   f"{value}.view(-1{', ' + tail if tail else ''}))`")  # fmt: skip
        return (
            f"`{entry.code.strip()}` (line {ln}) adds once per distinct id: the ids repeat (a "
            f"token appears many times in a batch), and PyTorch's indexed += keeps one write "
            f"per index, so {rows:,} rows of {spelled} lost the other repeats' gradients. "
            f"Accumulate every one with index_add_: {fix}"
        )
    return None


def _backward_statement(plan: Plan, line: int) -> ast.stmt | None:
    for top in plan.backward.body:
        for node in ast.walk(top):
            if isinstance(node, ast.stmt) and node.lineno == line:
                return node
    return None


# --------------------------------------------------------------------------- from the code


def loop_hint(name: str, spelled: str, lines: list[int], plan: Plan) -> str | None:
    """Backprop through time, read from the code: the gradient of a tensor the forward's loop
    uses at every step, written inside the backward's reversed loop with `=` (one step's
    part survives), or with no gradient carried from one step to the step before."""
    recurrent = _forward_recurrences(plan)
    if not recurrent or not _read_in_forward_loop(plan, name):
        return None
    for loop in _backward_loops(plan):
        inside = [ln for ln in lines if loop.lineno < ln <= (loop.end_lineno or ln)]
        if not inside:
            continue
        for stmt in ast.walk(loop):
            if not isinstance(stmt, ast.Assign) or stmt.lineno not in inside:
                continue
            target = ast.unparse(stmt.targets[0])
            if target in (GRAD_PREFIX + name, name + GRAD_SUFFIX) and not re.search(
                rf"(?<![\w.]){re.escape(target)}(?![\w])", ast.unparse(stmt.value)
            ):
                return (
                    f"`{ast.unparse(stmt).strip()}` (line {stmt.lineno}) is inside the loop "
                    f"over {ast.unparse(loop.target)}, so each step overwrites the last and "
                    f"only the final pass's part survives: {name} is used at every step of "
                    f"the forward, and its gradient sums the steps. Start from "
                    f"`{spelled} = torch.zeros_like({name})` before the loop and add each "
                    f"step's part with `{spelled} += ...`"
                )
        if _carried(loop):
            continue
        h, weight = sorted(recurrent.items())[0]
        through = f" @ {weight}.T" if weight else " through the matrix that multiplies it"
        return (
            f"{spelled} is summed over the steps, but no gradient is carried from one step to "
            f"the step before: in the forward, {h} at step t feeds both that step's output and "
            f"step t + 1's {h}, so at step t d{h} is the output's part plus what step t + 1 "
            f"sends back (the gradient before its tanh{through}). Start d{h}next = zeros "
            f"before the loop, add it to each step's d{h}, and set it for the step before at "
            "the end of each step"
        )
    return None


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _forward_recurrences(plan: Plan) -> dict[str, str | None]:
    """Names a forward loop rebinds from their own previous value (`h = tanh(... h ...)`),
    each with the matrix it is multiplied by there (`h @ Whh`: "Whh"), when one is."""
    found: dict[str, str | None] = {}
    for stmt in plan.forward.body:
        if not isinstance(stmt, ast.For):
            continue
        for sub in ast.walk(stmt):
            if isinstance(sub, ast.Assign) and isinstance(sub.targets[0], ast.Name):
                h = sub.targets[0].id
                if h in _names(sub.value):
                    found[h] = next(
                        (ast.unparse(n.right) for n in ast.walk(sub.value)
                         if isinstance(n, ast.BinOp) and isinstance(n.op, ast.MatMult)
                         and isinstance(n.left, ast.Name) and n.left.id == h),
                        None,
                    )  # fmt: skip
    return found


def _read_in_forward_loop(plan: Plan, name: str) -> bool:
    return any(isinstance(s, ast.For) and name in _value_reads(s) for s in plan.forward.body)


def _backward_loops(plan: Plan) -> list[ast.For]:
    """The backward's loops that run backwards in time (`reversed(range(...))`, or a range
    with a negative step)."""
    loops = []
    for node in (n for top in plan.backward.body for n in ast.walk(top)):
        if not isinstance(node, ast.For) or not isinstance(node.iter, ast.Call):
            continue
        it = node.iter
        if _call_name(it) == "reversed":
            loops.append(node)
        elif _call_name(it) == "range" and len(it.args) == 3:
            step = it.args[2]
            if isinstance(step, ast.UnaryOp) and isinstance(step.op, ast.USub):
                loops.append(node)
    return loops


def _carried(loop: ast.For) -> bool:
    """Whether some name the loop's body assigns is read, in the body, before it is
    assigned there: a value handed from one step to the next (`dhnext`, `dh`, or
    `dhs[:, t - 1] += ...` on a tensor read earlier in the step)."""
    assigned: set[str] = set()
    read_first: set[str] = set()
    for stmt in loop.body:
        for sub in ast.walk(stmt) if not isinstance(stmt, ast.For) else [stmt]:
            if isinstance(sub, (ast.Assign, ast.AugAssign)):
                targets = sub.targets if isinstance(sub, ast.Assign) else [sub.target]
                reads = _names(sub.value)
                bases = set()
                for t in targets:
                    base = t
                    while isinstance(base, (ast.Subscript, ast.Attribute)):
                        base = base.value
                    if isinstance(base, ast.Name):
                        bases.add(base.id)
                    if isinstance(t, ast.Subscript):
                        reads |= _names(t.slice)
                read_first |= reads - assigned
                assigned |= bases
    return bool(assigned & read_first)


# --------------------------------------------------------------------------- tied weights


def tied_hint(name: str, missing: list[str], plan: Plan, main: Outcome) -> str | None:
    """A missing_branch on a tensor that is both an embedding looked up and a matrix
    multiplied (a head tied to the token embedding): which of its two roles lost its part."""
    spelled = main.spelling.get(name, GRAD_PREFIX + name)
    roles: dict[str, tuple[int, str, ast.Assign]] = {}  # label -> (line, role, stmt)
    for line in tensor_uses(plan, name):
        stmt = _statement(plan, line)
        if not isinstance(stmt, ast.Assign):
            return None
        label = ", ".join(sorted(_names(stmt.targets[0]), key=ast.unparse(stmt.targets[0]).find))
        roles[label] = (line, _role(stmt.value, name), stmt)
    if {r for _, r, _ in roles.values()} != {"lookup", "head"}:
        return None
    lost = [roles[m] for m in missing if m in roles]
    if len(lost) != 1:
        return None
    line, role, stmt = lost[0]
    out = ast.unparse(stmt.targets[0])
    shape = tuple(main.autograd[name].shape)
    if role == "head":
        fix = _head_fix(stmt, name, spelled, main)
        return (
            f"{name} is tied: the token embedding and the output head (line {line}: "
            f"`{ast.unparse(stmt)}`) are the same tensor, so {spelled} is the sum of both parts. "
            f"{spelled} has the embedding's part but not the tied head's; add it: {fix}"
        )
    ids = _lookup_ids(stmt.value, name)
    fix = (f"`{spelled}.index_add_(0, {ids}.view(-1), d{out}.view(-1, {shape[-1]}))`"
           if ids else f"index_add_ of d{out} into the rows its ids picked")  # fmt: skip
    return (
        f"{name} is tied: the output head and the token embedding (line {line}: "
        f"`{ast.unparse(stmt)}`) are the same tensor {fmt_shape(shape)}, so {spelled} is the "
        f"sum of both parts. {spelled} has the tied head's part but not the embedding's; add "
        f"each position's d{out} into its token's row: {fix}"
    )


def _head_fix(stmt: ast.Assign, name: str, spelled: str, main: Outcome) -> str:
    """`dwte += dlogits.view(-1, V).T @ xf.view(-1, C)` for `logits = xf @ wte.T`."""
    out = ast.unparse(stmt.targets[0])
    v = stmt.value
    if (isinstance(v, ast.BinOp) and isinstance(v.op, ast.MatMult)
            and isinstance(v.left, ast.Name) and isinstance(v.right, ast.Attribute)
            and v.right.attr in ("T", "mT") and ast.unparse(v.right.value) == name):  # fmt: skip
        a, o = _value(main, v.left.id), _value(main, out)
        if a is not None and o is not None:
            return (
                f"`{spelled} += d{out}.view(-1, {o.shape[-1]}).T @ "
                f"{v.left.id}.view(-1, {a.shape[-1]})` (every position's part, summed)"
            )
    return f"the head's vector-Jacobian product with d{out}, summed over the positions"


def _role(value: ast.expr, name: str) -> str:
    if _lookup_ids(value, name) is not None:
        return "lookup"
    for node in ast.walk(value):
        if (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.MatMult)
            and name in _names(node)
        ):
            return "head"
        if _call_name(node) in ("linear", "matmul") and name in _names(node):
            return "head"
    return "other"


def _lookup_ids(value: ast.expr, name: str) -> str | None:
    """`ids` in `F.embedding(ids, name)`, `name[ids]`, `name.index_select(0, ids)`."""
    for node in ast.walk(value):
        if _call_name(node) == "embedding" and len(node.args) >= 2:
            if isinstance(node.args[1], ast.Name) and node.args[1].id == name:
                return ast.unparse(node.args[0])
        if _call_name(node) == "index_select" and isinstance(node.func.value, ast.Name):
            if node.func.value.id == name and len(node.args) >= 2:
                return ast.unparse(node.args[1])
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
            if node.value.id == name and not isinstance(node.slice, (ast.Slice, ast.Tuple)):
                return ast.unparse(node.slice)
    return None
