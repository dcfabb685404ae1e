"""The static faces of a %%backward check, for where no widget draws (nbviewer, GitHub,
Colab without its custom widget manager): a text/html page of the verdict, the check table
and the selected gradient's maps (inline SVG, no script), and a text/plain summary. They read
the same answer the widget draws, with the same states and words as static/js/program-view.js.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

STATE_TEXT = {
    "match": "✓ matches",
    "suspect": "≈ suspect",
    "first": "✗ first failure",
    "fail": "✗ differs",
    "unwritten": "○ not written",
}
DIVERGING = [(0, "#2166ac"), (0.25, "#67a9cf"), (0.45, "#d1e5f0"), (0.5, "#f7f7f7"),
             (0.55, "#fddbc7"), (0.75, "#ef8a62"), (1, "#b2182b")]  # fmt: skip
TOLERANCE = [(0, "#ffffff"), (1 / 3, "#e7ecf2"), (1 / 3 + 0.001, "#f4a582"), (1, "#b2182b")]
MAP_PX = 220  # each map's width


def states(check: dict[str, Any]) -> dict[str, str]:
    out = {}
    for name, row in check["tensors"].items():
        if not row["written"]:
            out[name] = "unwritten"
        elif row["allclose"]:
            out[name] = "suspect" if row.get("suspect") else "match"
        elif name == check["first_failure"]:
            out[name] = "first"
        else:
            out[name] = "after" if row.get("after") else "fail"
    return out


def shape(dims: list[int] | None) -> str:
    if dims is None:
        return "–"
    return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(map(str, dims))})"


def num(x: float | None) -> str:
    if x is None:
        return "–"
    if x == 0:
        return "0"
    return f"{x:.2e}" if abs(x) < 1e-3 or abs(x) >= 1e5 else f"{x:.3g}"


def verdict(answer: dict[str, Any]) -> tuple[str, str]:
    """(kind, text) of the verdict line, as the page words it."""
    c = answer["check"]
    st = states(c)
    matching = sum(s in ("match", "suspect") for s in st.values())
    written, total = c["written"], c["total"]
    if answer.get("backward_error"):
        e = answer["backward_error"]
        return "error", (f"✗ Backward line {e['line']} cannot run · {written} of {total} "
                         f"written before it, {matching} match")  # fmt: skip
    if c["first_failure"]:
        row = c["tensors"][c["first_failure"]]
        spelled = row.get("spelling") or f"d{c['first_failure']}"
        lines = ", ".join(map(str, row["lines"]))
        return "fail", (f"✗ First wrong gradient: {spelled} (line {lines}) · {matching} of "
                        f"{written} written match · {written} of {total} written")  # fmt: skip
    if written < total:
        return "incomplete", f"{written} of {total} written · the {written} written match autograd"
    return "all-match", f"✓ All {total} gradients written, all match autograd"


def selected(answer: dict[str, Any]) -> str | None:
    c = answer["check"]
    params = [n for n in c["tensors"] if answer["tensors"].get(n, {}).get("role") == "param"]
    return c["first_failure"] or (params[-1] if params else None)


def plain(answer: dict[str, Any] | None, notes: list[str]) -> str:
    """A few lines: the verdict, every gradient that differs with its hint, the notes."""
    lines = list(notes)
    if answer:
        lines.insert(0, "Broadprop: " + verdict(answer)[1])
        st = states(answer["check"])
        for name, row in answer["check"]["tensors"].items():
            if st[name] in ("first", "fail", "after"):
                spelled = row.get("spelling") or f"d{name}"
                why = row.get("hint") or (f"uses {answer['check']['first_failure']}"
                                          if st[name] == "after" else "differs from autograd")  # fmt: skip
                lines.append(f"  ✗ {spelled} (line {', '.join(map(str, row['lines']))}): {why}")
        if answer.get("backward_error"):
            e = answer["backward_error"]
            lines.append(f"  line {e['line']}: {e['message'].splitlines()[0]}")
    return "\n".join(lines)


def _colour(scale: list[tuple[float, str]], t: float) -> str:
    t = min(1.0, max(0.0, t))
    for (a, ca), (b, cb) in zip(scale, scale[1:]):
        if t <= b:
            f = 0.0 if b == a else (t - a) / (b - a)
            rgb = [round(int(ca[i:i + 2], 16) * (1 - f) + int(cb[i:i + 2], 16) * f)
                   for i in (1, 3, 5)]  # fmt: skip
            return "#" + "".join(f"{v:02x}" for v in rgb)
    return scale[-1][1]


def _svg(hm: dict[str, Any] | None, zmax: float, tolerance: bool = False) -> str:
    if not hm:
        return '<p class="muted">not written</p>'
    z = hm["z"]
    rows, cols = len(z), max((len(r) for r in z), default=0)
    if not rows or not cols:
        return '<p class="muted">empty</p>'
    cell = MAP_PX / cols
    height = max(cell * rows, 12)
    rects = []
    for i, row in enumerate(z):
        for j, v in enumerate(row):
            if v is None or not math.isfinite(v):
                fill = "#000"
            elif tolerance:
                fill = _colour(TOLERANCE, v / 3)
            else:
                fill = _colour(DIVERGING, 0.5 + v / (2 * zmax))
            rects.append(f'<rect x="{j * cell:.2f}" y="{i * height / rows:.2f}" '
                         f'width="{cell + 0.05:.2f}" height="{height / rows + 0.05:.2f}" '
                         f'fill="{fill}"/>')  # fmt: skip
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{MAP_PX}" height="{height:.0f}" '
            f'shape-rendering="crispEdges">{"".join(rects)}</svg>')  # fmt: skip


def _maps(answer: dict[str, Any], name: str) -> str:
    g = answer["gradients"].get(name)
    if not g:
        return ""
    manual = g["heatmap"] if g["source"] == "manual" else None
    auto = (g.get("reference_heatmap") or (g.get("autograd") or {}).get("heatmap")
            if g["source"] == "manual" else g["heatmap"])  # fmt: skip
    values = [abs(v) for hm in (manual, auto) if hm for r in hm["z"] for v in r
              if v is not None and math.isfinite(v)]  # fmt: skip
    zmax = max([1e-30, *values])
    figures = [("manual", _svg(manual, zmax)), ("autograd", _svg(auto, zmax)),
               ("|manual − autograd| ÷ tolerance", _svg(g.get("tolerance_heatmap"), 0, True))]  # fmt: skip
    cells = "".join(
        f'<figure style="margin:0"><figcaption style="font-size:12px;color:#6c757d">{escape(t)}'
        f"</figcaption>{svg}</figure>"
        for t, svg in figures
    )
    return (f'<p><b>Gradient of {escape(name)}</b> <span style="color:#6c757d">'
            f'{shape(g["shape"])}</span></p><div style="display:flex;gap:12px;flex-wrap:wrap">'
            f"{cells}</div>")  # fmt: skip


ROW_STYLE = {"first": "background:#ffe3e3", "after": "background:#fff5f5;color:#868e96",
             "unwritten": "color:#adb5bd", "suspect": "background:#fff9db"}  # fmt: skip


def page(answer: dict[str, Any] | None, notes: list[str]) -> str:
    """The static page: the verdict, the notes, the check table and one gradient's maps."""
    parts = [f'<p style="color:#c92a2a;margin:2px 0">{escape(n)}</p>' for n in notes]
    if answer:
        kind, text = verdict(answer)
        colour = (
            "#2b8a3e"
            if kind == "all-match"
            else "#c92a2a"
            if kind in ("fail", "error")
            else "#8a6d00"
        )
        parts.insert(0, f'<p data-verdict="{kind}" style="font-weight:600;color:{colour}">'
                        f"{escape(text)}</p>")  # fmt: skip
        if answer.get("backward_error"):
            e = answer["backward_error"]
            parts.append(f"<p><b>Line {e['line']}:</b> {escape(e['message'].splitlines()[0])}</p>")
        parts.append(_table(answer))
        name = selected(answer)
        if name:
            parts.append(_maps(answer, name))
    return f'<div class="broadprop-static" style="font:13px/1.45 system-ui,sans-serif">{"".join(parts)}</div>'


def _table(answer: dict[str, Any]) -> str:
    c = answer["check"]
    st = states(c)
    head = "".join(f"<th>{t}</th>" for t in ("gradient", "line", "shape wanted", "made", "exact",
                                             "allclose", "max diff", "state"))  # fmt: skip
    rows = []
    for name, row in c["tensors"].items():
        s = st[name]
        wanted = answer["tensors"].get(name, {}).get("shape")
        made = (
            (row.get("shape") or (wanted if row["shape_ok"] else None)) if row["written"] else None
        )
        note = f"⤷ uses {c['first_failure']}" if s == "after" else STATE_TEXT[s]
        cells = [f"<code>{escape(row.get('spelling') or 'd' + name)}</code>",
                 ", ".join(map(str, row["lines"])) or "–", shape(wanted), shape(made),
                 ("✓" if row["exact"] else "–") if row["written"] else "",
                 ("✓" if row["allclose"] else "✗") if row["written"] else "",
                 num(row.get("max_abs_err")), note]  # fmt: skip
        tds = "".join(f"<td>{v}</td>" for v in cells)
        rows.append(
            f'<tr class="st-{s}" data-name="{escape(name)}" style="{ROW_STYLE.get(s, "")}">{tds}</tr>'
        )
        why = row.get("hint") or row.get("why")
        if why and s not in ("match", "after"):
            rows.append(f'<tr style="{ROW_STYLE.get(s, "")}"><td colspan="8" style="white-space:normal">'
                        f"{escape(why)}</td></tr>")  # fmt: skip
    return (
        f'<table class="checks" style="border-collapse:collapse;font-size:12.5px">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


# --------------------------------------------------------------------------- %%forward


def forward_summary(answer: dict[str, Any]) -> str:
    """One line: the loss, and which tensors now hold a gradient for the backward."""
    kept = [n for n, t in answer["tensors"].items() if t["role"] in ("param", "intermediate")]
    return (f"Broadprop forward: loss {num(answer['loss'])} · {len(answer['forward'])} lines · "
            f"{len(kept)} tensors keep their gradient: {', '.join(kept)}")  # fmt: skip


def forward_plain(answer: dict[str, Any]) -> str:
    lines = [forward_summary(answer)]
    for line in answer["forward"]:
        out = line["steps"][-1]["output"] if line["steps"] else None
        lines.append(f"  {line['line']:>3}  {line['code']:<48} {shape(out) if out else ''}")
    return "\n".join(lines)


def forward_page(answer: dict[str, Any]) -> str:
    """The forward's lines with each one's shape, as the widget's shape flow lists them."""
    rows = []
    for line in answer["forward"]:
        out = line["steps"][-1]["output"] if line["steps"] else None
        reads = ", ".join(line.get("reads", []))
        rows.append(f"<tr><td>{line['line']}</td><td><code>{escape(line['code'])}</code></td>"
                    f"<td>{escape(reads)}</td><td>{shape(out) if out else ''}</td></tr>")  # fmt: skip
    head = "".join(f"<th>{t}</th>" for t in ("line", "code", "reads", "shape"))
    return (
        '<div class="broadprop-static" style="font:13px/1.45 system-ui,sans-serif">'
        f'<p style="font-weight:600">{escape(forward_summary(answer))}</p>'
        '<table class="forward" style="border-collapse:collapse;font-size:12.5px">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )
