// A program's answer (POST /api/program) drawn: each gradient's state, the verdict line, the
// check's rows and the gradient maps. The program page (program.js) and the notebook widget
// (notebook.js, behind %%backward) draw with these same functions.
import { DIVERGING, toleranceScale } from "./colours.js";
import { esc, h, num, shape } from "./format.js";

/** Each gradient's state: match, suspect, first (the first failure), after (wrong, and
 * computed from the first failure's gradient), fail, unwritten. */
export function states(check) {
  const out = {};
  for (const [name, row] of Object.entries(check.tensors)) {
    if (!row.written) out[name] = "unwritten";
    else if (row.allclose) out[name] = row.suspect ? "suspect" : "match";
    else if (name === check.first_failure) out[name] = "first";
    else if (row.after) out[name] = "after";
    else out[name] = "fail";
  }
  return out;
}

/** [kind, html] of the verdict line; `pending`: the hidden lines still to write. */
export function verdictLine(data, st, pending = []) {
  const c = data.check;
  const total = c.total;
  const written = c.written;
  const matching = Object.values(st).filter((s) => s === "match" || s === "suspect").length;
  const suspects = c.suspects?.length ? ` · <span class="warn">≈ ${c.suspects.length} suspect (${c.suspects.map(esc).join(", ")})</span>` : "";
  const hidden = pending.length ? ` · ${pending.length} hidden line${pending.length > 1 ? "s" : ""} still to write` : "";
  // the separator goes with the loss: a phone hides the summary's muted parts, dot and all
  const loss = data.loss == null ? "" : ` <span class="muted">· loss ${num(data.loss, 4)}</span>`;
  if (data.backward_error) {
    return ["error", `<span class="bad">✗ Backward line ${data.backward_error.line} cannot run</span> · ${written} of ${total} written before it, ${matching} match${hidden}${loss}`];
  }
  if (c.first_failure) {
    const row = c.tensors[c.first_failure];
    return ["fail", `<span class="bad">✗ First wrong gradient: ${esc(row.spelling || `d${c.first_failure}`)} (line ${row.lines.join(", ")})</span> · ${matching} of ${written} written match · ${written} of ${total} written${hidden}${loss}`];
  }
  if (written < total && !pending.length && paramsDone(data, st)) {
    // every parameter's gradient written and matching: a course's shortcut (CS231n's dscores)
    // may skip intermediates, and says which
    const skipped = Object.keys(st).filter((n) => st[n] === "unwritten");
    return ["params-match", `<span class="ok">✓ Every parameter's gradient matches autograd</span> · ${written} of ${total} written (not written: ${skipped.map((n) => `d${esc(n)}`).join(", ")}, which the backward goes past)${suspects}${loss}`];
  }
  if (written < total || pending.length) {
    return ["incomplete", `<span class="todo-count">${written} of ${total} written</span> · the ${written} written match autograd${hidden}${suspects}${loss}`];
  }
  return ["all-match", `<span class="ok">✓ All ${total} gradients written, all match autograd</span>${suspects}${loss}`];
}

/** Every parameter (an input with a gradient) written, and all that is written matches. */
function paramsDone(data, st) {
  const params = Object.keys(st).filter((n) => data.tensors[n]?.role === "param");
  return params.length > 0 && params.every((n) => st[n] === "match" || st[n] === "suspect")
    && Object.values(st).every((s) => s === "match" || s === "suspect" || s === "unwritten");
}

/** `text` with its `code` spans as <code> elements (for h's children). */
export function rich(text) {
  return String(text).split("`").map((part, i) => (i % 2 ? h("code", {}, part) : part));
}

const STATE_TEXT = {
  match: "✓ matches",
  suspect: "≈ suspect",
  first: "✗ first failure",
  fail: "✗ differs",
  unwritten: "○ not written",
};

/** The check's rows (with a row of its own for each hint), in the backward's order. */
export function checkRows(data, st, selected, onSelect) {
  const c = data.check;
  const first = c.first_failure ? c.tensors[c.first_failure] : null;
  const firstName = first ? first.spelling || `d${c.first_failure}` : "";
  const rows = [];
  for (const [name, row] of Object.entries(c.tensors)) {
    const s = st[name];
    const spelled = row.spelling || `d${name}`;
    const wanted = data.tensors[name]?.shape;
    const made = row.written ? (row.shape || (row.shape_ok ? wanted : null)) : null;
    const note = s === "after" ? `⤷ uses ${firstName}` : s === "unwritten" && data.backward_error ? "○ not run" : STATE_TEXT[s];
    const tr = h("tr", { class: `st-${s}${name === selected ? " selected" : ""}`, "data-name": name, tabindex: 0 },
      h("td", {}, h("code", {}, spelled)),
      h("td", { class: "num" }, row.lines?.length ? row.lines.join(", ") : "–"),
      h("td", {}, shape(wanted)),
      h("td", { class: row.written && !row.shape_ok ? "bad" : "" }, made ? shape(made) : "–"),
      h("td", { class: "mark" }, row.written ? (row.exact ? "✓" : "–") : ""),
      h("td", { class: "mark" }, row.written ? (row.allclose ? "✓" : "✗") : ""),
      h("td", { class: "num" }, row.max_abs_err == null ? "–" : num(row.max_abs_err)),
      h("td", { class: "state", title: s === "after" ? `may be wrong only because it is computed from ${firstName}, the first failure: fix that first` : null }, note),
    );
    tr.addEventListener("click", () => onSelect(name));
    tr.addEventListener("keydown", (ev) => ev.key === "Enter" && onSelect(name));
    rows.push(tr);
    // one sentence per failing row: the diagnosis (app/check/diagnosis.py chooses between it
    // and a hand-written hint), else the hint; a row after the first failure only when its
    // own slip is found (an upstream one is said by its state already)
    const d = row.diagnosis;
    const why = d?.message || row.hint || row.why;
    const own = s !== "after" || (d && d.kind !== "upstream");
    if (why && s !== "match" && own) {
      rows.push(h("tr", { class: `why st-${s}`, "data-kind": d?.kind || null },
        h("td", { colspan: 8 }, ...rich(why), d ? h("small", { class: "muted evidence" }, evidence(d)) : null)));
    } else if (row.recheck && s === "match") {
      rows.push(h("tr", { class: "why st-match recheck" }, h("td", { colspan: 8 }, ...rich(row.recheck))));
    }
  }
  return rows;
}

/** What the diagnosis measured, beside its sentence. */
function evidence(d) {
  if (d.kind === "scale") return ` (G / R = ${num(d.factor)} in every entry)`;
  if (d.kind === "missing_branch") return ` (missing: the part through ${d.missing.join(", ")})`;
  if (d.kind === "upstream") return d.root ? ` (first wrong: d${d.root})` : "";
  return "";
}

/** The name a view selects first: the first failure, else the last parameter written. */
export function firstSelection(data) {
  const params = Object.keys(data.check.tensors).filter((n) => data.tensors[n]?.role === "param");
  return data.check.first_failure || params[params.length - 1] || null;
}

// --------------------------------------------------------------------------- gradient maps

/** The three maps of a name's gradient: manual, autograd, and the difference in units of
 * the tolerance; one colour scale for the first two. */
export function gradientMaps(data, name) {
  const g = data.gradients[name];
  const manual = g.source === "manual" ? g.heatmap : null;
  const auto = g.source === "manual" ? g.reference_heatmap || g.autograd?.heatmap : g.heatmap;
  const vals = [manual, auto].filter(Boolean).flatMap((hm) => hm.z.flat()).filter((v) => v != null && Number.isFinite(v));
  const zmax = Math.max(1e-30, ...vals.map(Math.abs));
  return { manual, auto, difference: g.tolerance_heatmap || null, zmax };
}

/** One heatmap with Plotly (window.Plotly), or "not written". */
export function heat(el, hm, { zmax, tolerance }) {
  if (!hm) {
    Plotly.purge(el);
    el.replaceChildren(h("p", { class: "muted empty" }, "not written"));
    return;
  }
  el.querySelector(":scope > .empty")?.remove(); // Plotly's own nodes stay: react reuses them
  const oneD = hm.z.length === 1;
  let trace = { type: "heatmap", z: hm.z, zmid: 0, zmin: -zmax, zmax, colorscale: DIVERGING, colorbar: { thickness: 10 } };
  if (tolerance) { // the main page's scale of |difference| ÷ tolerance (colours.js)
    const { z, colour } = toleranceScale(hm.z);
    trace = { type: "heatmap", z, ...colour, colorbar: { thickness: 10, ...colour.colorbar },
      hovertemplate: "|difference| ÷ tolerance %{customdata:.3g}<extra></extra>" };
  }
  Plotly.react(el, [trace], {
    height: oneD ? 120 : 260, margin: { l: 34, r: 8, t: 6, b: 26 }, yaxis: { autorange: "reversed" }, paper_bgcolor: "#fff",
  }, { displayModeBar: false, responsive: true, staticPlot: false });
}
