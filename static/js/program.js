// The program page (GET /program): a forward and a backward written as lines, run on every
// change (debounced) through POST /api/program, with the check in the backward's order, the
// shape-flow diagram, the selected name's gradient maps and training. The program lives in
// the URL (program-state.js); panes are program-editor.js, the diagram program-diagram.js,
// training program-train.js.
import { ApiError, errorsByField } from "./api.js";
import { esc, h, num, shape } from "./format.js";
import { loadPlotly, plotlyReady } from "./plotly-ready.js";
import { CodeEditor } from "./program-editor.js";
import { drawFlow } from "./program-diagram.js";
import { fromQuery, hideLines, placeholders, queryFor } from "./program-state.js";
import { ProgramTrainer } from "./program-train.js";

const $ = (id) => document.getElementById(id);
const PRESETS = JSON.parse($("program-presets").textContent);
const DEBOUNCE_MS = 300;

let program = null; // the POST /api/program body on screen
let presetId = null; // the preset it came from, while unchanged
let data = null; // the last answer drawn
let selected = null;
let lastFailure = null;
let controller = null;
let timer = 0;
let runs = 0;

const forward = new CodeEditor($("forward-editor"), { label: "Forward", onInput: (t) => edit({ forward: t }) });
const backward = new CodeEditor($("backward-editor"), { label: "Backward", onInput: (t) => edit({ backward: t }) });

function preset() {
  return PRESETS.find((p) => p.id === presetId) || null;
}

// --------------------------------------------------------------------------- state

function edit(change) {
  Object.assign(program, change);
  schedule();
}

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(() => (writeURL(), run()), DEBOUNCE_MS);
}

async function writeURL() {
  const query = await queryFor(program, preset());
  if (query !== location.search) history.replaceState(null, "", `/program${query}`);
  $("preset").value = query.startsWith("?preset=") ? presetId : "";
}

function load(next, id) {
  program = next;
  presetId = id;
  forward.value = program.forward;
  backward.value = program.backward || "";
  $("inputs").value = JSON.stringify(program.inputs, null, 1);
  $("inputs-summary").textContent = `(${Object.keys(program.inputs).length})`;
  $("seed").value = program.seed ?? 0;
  $("dtype").value = program.dtype ?? "float32";
  $("loss-name").textContent = program.loss || "loss";
  $("preset").value = id || "";
  selected = null;
}

// --------------------------------------------------------------------------- running

async function run() {
  controller?.abort();
  const mine = (controller = new AbortController());
  document.body.dataset.state = "loading";
  $("loading").hidden = false;
  try {
    const res = await fetch("/api/program", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(program), signal: mine.signal,
    });
    let body = null;
    try { body = await res.json(); } catch { body = null; }
    if (!res.ok) throw new ApiError(res.status, body, res.headers.get("Retry-After"));
    const t0 = performance.now();
    draw(body);
    document.body.dataset.redrawMs = (performance.now() - t0).toFixed(1);
    document.body.dataset.state = "ready";
  } catch (err) {
    if (err.name === "AbortError") return;
    refused(err);
    document.body.dataset.state = "error";
  } finally {
    if (controller === mine) {
      controller = null;
      $("loading").hidden = true;
      document.body.dataset.runs = String(++runs);
    }
  }
}

/** A 422 at a line: shown under its pane, the line marked; anything else in the banner. */
function refused(err) {
  clearLineErrors();
  const detail = err instanceof ApiError && Array.isArray(err.body?.detail) ? err.body.detail : [];
  const at = detail.find((d) => Array.isArray(d.loc) && ["forward", "backward"].includes(d.loc[1]) && Number.isInteger(d.loc[2]));
  setVerdict("error", at ? `Line ${at.loc[2]} of the ${at.loc[1]} is refused: nothing was checked.` : "The program was not run.");
  if (at) {
    const which = at.loc[1];
    showLineError(which, at.loc[2], at.msg, at.ctx?.operands, null);
    (which === "forward" ? forward : backward).mark({ [at.loc[2]]: { cls: "err", title: at.msg.split("\n")[0] } });
    (which === "forward" ? backward : forward).mark({});
    $("run-error").hidden = true;
    return;
  }
  const errs = errorsByField(err);
  if (errs.inputs) $("inputs-error").textContent = errs.inputs.join("; ");
  $("run-error").hidden = false;
  $("run-error").textContent = Object.entries(errs).map(([k, m]) => (k && !k.startsWith("@") ? `${k}: ${m.join("; ")}` : m.join("; "))).join(" ");
}

function clearLineErrors() {
  for (const which of ["forward", "backward"]) $(`${which}-error`).hidden = true;
  $("inputs-error").textContent = "";
  $("run-error").hidden = true;
}

function showLineError(which, line, message, operands, hint) {
  const box = $(`${which}-error`);
  const [head, ...rest] = String(message).split("\n");
  const shapes = operands?.length ? h("p", { class: "shapes" }, ...operands.map((o) => h("code", {}, `${o.expr} ${shape(o.shape)}`))) : null;
  box.replaceChildren(
    h("p", {}, h("b", {}, `Line ${line}: `), head),
    rest.length ? h("pre", {}, rest.join("\n")) : null,
    shapes,
    hint ? h("p", { class: "hint" }, "Hint: ", hint) : null,
  );
  box.dataset.line = line;
  box.hidden = false;
}

// --------------------------------------------------------------------------- drawing

/** Each gradient's state: match, suspect, first (the first failure), after (wrong, and
 * computed from the first failure's gradient), fail, unwritten. */
function states(check) {
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

function draw(answer) {
  data = answer;
  clearLineErrors();
  const newFailure = data.check.first_failure && data.check.first_failure !== lastFailure;
  lastFailure = data.check.first_failure;
  if (newFailure) selected = data.check.first_failure; // a new first failure: show it
  if (!selected || !(selected in data.tensors)) {
    // the first failure, else the first parameter the backward writes
    const params = Object.keys(data.check.tensors).filter((n) => data.tensors[n]?.role === "param");
    selected = data.check.first_failure || params[params.length - 1] || null;
  }
  const st = states(data.check);
  const pending = placeholders(program.backward || "");
  verdict(st, pending);
  table(st);
  todo(st);
  markLines();
  if (data.backward_error) {
    const e = data.backward_error;
    showLineError("backward", e.line, e.message, e.operands, e.hint);
  }
  drawFlow($("flow"), data, { states: st, selected, onSelect: select });
  maps();
  exportState();
}

function setVerdict(kind, html) {
  const el = $("verdict");
  el.dataset.verdict = kind;
  el.innerHTML = html;
}

function verdict(st, pending) {
  const c = data.check;
  const total = c.total;
  const written = c.written;
  const matching = Object.values(st).filter((s) => s === "match" || s === "suspect").length;
  const suspects = c.suspects?.length ? ` · <span class="warn">≈ ${c.suspects.length} suspect (${c.suspects.map(esc).join(", ")})</span>` : "";
  const hidden = pending.length ? ` · ${pending.length} hidden line${pending.length > 1 ? "s" : ""} still to write` : "";
  const loss = `<span class="muted">loss ${num(data.loss, 4)}</span>`;
  if (data.backward_error) {
    setVerdict("error", `<span class="bad">✗ Backward line ${data.backward_error.line} cannot run</span> · ${written} of ${total} written before it, ${matching} match${hidden} · ${loss}`);
  } else if (c.first_failure) {
    const row = c.tensors[c.first_failure];
    setVerdict("fail", `<span class="bad">✗ First wrong gradient: ${esc(row.spelling || `d${c.first_failure}`)} (line ${row.lines.join(", ")})</span> · ${matching} of ${written} written match · ${written} of ${total} written${hidden} · ${loss}`);
  } else if (written < total || pending.length) {
    setVerdict("incomplete", `<span class="todo-count">${written} of ${total} written</span> · the ${written} written match autograd${hidden}${suspects} · ${loss}`);
  } else {
    setVerdict("all-match", `<span class="ok">✓ All ${total} gradients written, all match autograd</span>${suspects} · ${loss}`);
  }
}

const STATE_TEXT = {
  match: "✓ matches",
  suspect: "≈ suspect",
  first: "✗ first failure",
  fail: "✗ differs",
  unwritten: "○ not written",
};

function table(st) {
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
    tr.addEventListener("click", () => select(name));
    tr.addEventListener("keydown", (ev) => ev.key === "Enter" && select(name));
    rows.push(tr);
    // one sentence per failing row: the diagnosis (app/check/diagnosis.py chooses between it
    // and a hand-written hint), else the hint; a row after the first failure only when its
    // own slip is found (an upstream one is said by its state already)
    const d = row.diagnosis;
    const why = d?.message || row.hint || row.why;
    const own = s !== "after" || (d && d.kind !== "upstream");
    if (why && s !== "match" && own) {
      rows.push(h("tr", { class: `why st-${s}`, "data-kind": d?.kind || null },
        h("td", { colspan: 8 }, why, d ? h("small", { class: "muted evidence" }, evidence(d)) : null)));
    }
  }
  $("checks").tBodies[0].replaceChildren(...rows);
}

/** What the diagnosis measured, a click away from its sentence. */
function evidence(d) {
  if (d.kind === "scale") return ` (G / R = ${num(d.factor)} in every entry)`;
  if (d.kind === "missing_branch") return ` (missing: the part through ${d.missing.join(", ")})`;
  if (d.kind === "upstream") return d.root ? ` (first wrong: d${d.root})` : "";
  return "";
}

function todo(st) {
  const c = data.check;
  const left = Object.entries(c.tensors).filter(([n]) => st[n] === "unwritten");
  $("todo-count").textContent = left.length ? `(${left.length})` : "";
  $("todo").replaceChildren(...(left.length ? left.map(([n]) =>
    h("li", { "data-name": n }, h("code", {}, `d${n}`), ` ${shape(data.tensors[n]?.shape)}`, h("span", { class: "muted" }, ` the gradient of ${n}`)))
    : [h("li", { class: "done" }, "Nothing left to write.")]));
}

function forwardLine(name) {
  return data.forward.find((f) => f.target === name)?.line ?? null;
}

/** Marks in both panes: the first failure's lines, the line that cannot run, the hidden
 * placeholders, and the selected name's lines. */
function markLines() {
  const fwd = {};
  const bwd = {};
  for (const [line] of placeholders(program.backward || "")) bwd[line] = { cls: "hidden", title: "hidden: write this gradient" };
  if (selected) {
    const f = forwardLine(selected);
    if (f) fwd[f] = { cls: "sel", title: `${selected} is made here` };
    for (const l of data.check.tensors[selected]?.lines || []) bwd[l] = { cls: "sel", title: `writes d${selected}` };
  }
  const first = data.check.first_failure;
  if (first) for (const l of data.check.tensors[first].lines) bwd[l] = { cls: "bad", title: `the first failing gradient: d${first}` };
  if (data.backward_error) bwd[data.backward_error.line] = { cls: "err", title: data.backward_error.message.split("\n")[0] };
  forward.mark(fwd);
  backward.mark(bwd);
}

function select(name) {
  selected = name;
  for (const tr of $("checks").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.name === name);
  for (const g of $("flow").querySelectorAll(".node")) g.classList.toggle("selected", g.dataset.name === name);
  markLines();
  const f = forwardLine(name);
  if (f) forward.reveal(f);
  const lines = data.check.tensors[name]?.lines || [];
  if (lines.length) backward.reveal(lines[0]);
  maps();
}

// --------------------------------------------------------------------------- gradient maps

const DIVERGING = [[0, "#2166ac"], [0.25, "#67a9cf"], [0.45, "#d1e5f0"], [0.5, "#f7f7f7"], [0.55, "#fddbc7"], [0.75, "#ef8a62"], [1, "#b2182b"]];
const TOLERANCE = [[0, "#ffffff"], [1 / 3, "#e7ecf2"], [1 / 3 + 0.001, "#f4a582"], [1, "#b2182b"]];

function heat(el, hm, { zmax, tolerance }) {
  if (!hm) {
    Plotly.purge(el);
    el.replaceChildren(h("p", { class: "muted empty" }, "not written"));
    return;
  }
  el.querySelector(":scope > .empty")?.remove(); // Plotly's own nodes stay: react reuses them
  const oneD = hm.z.length === 1;
  const trace = tolerance
    ? { type: "heatmap", z: hm.z, zmin: 0, zmax: 3, colorscale: TOLERANCE, colorbar: { thickness: 10, tickvals: [0, 1, 2, 3] } }
    : { type: "heatmap", z: hm.z, zmid: 0, zmin: -zmax, zmax, colorscale: DIVERGING, colorbar: { thickness: 10 } };
  Plotly.react(el, [trace], {
    height: oneD ? 120 : 260, margin: { l: 34, r: 8, t: 6, b: 26 }, yaxis: { autorange: "reversed" }, paper_bgcolor: "#fff",
  }, { displayModeBar: false, responsive: true, staticPlot: false });
}

async function maps() {
  const name = selected;
  const g = name && data.gradients[name];
  const t = name && data.tensors[name];
  $("selected-title").textContent = name ? `Gradient of ${name}` : "Gradient";
  if (!name || !g) {
    $("selected-note").textContent = name ? `${name} has no gradient (${t?.role ?? "not a tensor"})` : "Click a name in the diagram or a row of the check.";
    for (const id of ["map-manual", "map-autograd", "map-difference"]) {
      if (window.Plotly) Plotly.purge($(id));
      $(id).replaceChildren();
    }
    document.body.dataset.maps = "none";
    return;
  }
  const row = data.check.tensors[name];
  $("selected-note").textContent = `${shape(g.shape)} · ${row.written ? `written at line ${row.lines.join(", ")} as ${row.spelling}` : "not written: autograd's only"}`;
  document.body.dataset.maps = "pending";
  if (!window.Plotly) (loadPlotly(), await plotlyReady);
  if (selected !== name || data.gradients[name] !== g) return;
  const manual = g.source === "manual" ? g.heatmap : null;
  const auto = g.source === "manual" ? g.reference_heatmap || g.autograd?.heatmap : g.heatmap;
  const vals = [manual, auto].filter(Boolean).flatMap((hm) => hm.z.flat()).filter((v) => v != null && Number.isFinite(v));
  const zmax = Math.max(1e-30, ...vals.map(Math.abs));
  heat($("map-manual"), manual, { zmax });
  heat($("map-autograd"), auto, { zmax });
  heat($("map-difference"), g.tolerance_heatmap || null, { tolerance: true });
  document.body.dataset.maps = name;
}

// --------------------------------------------------------------------------- share, export

let exportReady = false;
function exportState() {
  const pending = placeholders(program.backward || "").length;
  exportReady = !pending;
  for (const b of document.querySelectorAll(".share [data-format]")) b.disabled = !exportReady;
  $("share-status").textContent = pending ? "Write the hidden lines to download this program." : "";
}

async function download(format) {
  $("share-status").textContent = "";
  try {
    const res = await fetch("/api/export", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ program, format }) });
    if (!res.ok) throw new Error(`the server answered ${res.status}`);
    const blob = await res.blob();
    const a = h("a", { href: URL.createObjectURL(blob), download: `program.${format}` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  } catch (err) {
    $("share-status").textContent = `Download failed: ${err.message}`;
  }
}

async function exerciseLink() {
  const spec = $("hide").value.trim();
  const { text, hidden } = hideLines(program.backward || "", spec);
  const query = await queryFor({ ...program, backward: text }, null);
  const url = `${location.origin}/program${query}`;
  $("exercise-link").dataset.url = url;
  try {
    await navigator.clipboard.writeText(url);
    $("share-status").textContent = `Copied: a link with ${hidden.length ? hidden.join(", ") : "nothing"} hidden.`;
  } catch {
    $("share-status").replaceChildren("Exercise link: ", h("a", { href: url }, "open"), ` (${hidden.join(", ") || "nothing"} hidden)`);
  }
}

// --------------------------------------------------------------------------- wiring

$("show-code").addEventListener("click", () => view(false));
$("show-todo").addEventListener("click", () => view(true));
function view(list) {
  $("backward-editor").hidden = list;
  $("todo").hidden = !list;
  $("show-code").setAttribute("aria-selected", String(!list));
  $("show-todo").setAttribute("aria-selected", String(list));
}

$("inputs").addEventListener("input", () => {
  try {
    const inputs = JSON.parse($("inputs").value);
    $("inputs-error").textContent = "";
    edit({ inputs });
  } catch (err) {
    $("inputs-error").textContent = `Not JSON yet: ${err.message}`;
  }
});
$("seed").addEventListener("input", () => {
  const seed = Number($("seed").value);
  if (Number.isInteger(seed) && seed >= 0) edit({ seed });
});
$("dtype").addEventListener("change", () => edit({ dtype: $("dtype").value }));
$("preset").addEventListener("change", () => {
  const p = PRESETS.find((x) => x.id === $("preset").value);
  if (!p) return;
  load(structuredClone(p.request), p.id);
  history.replaceState(null, "", `/program?preset=${encodeURIComponent(p.id)}`);
  run();
});
$("exercise-link").addEventListener("click", exerciseLink);
for (const b of document.querySelectorAll(".share [data-format]")) b.addEventListener("click", () => download(b.dataset.format));

new ProgramTrainer({
  program: () => program,
  describe: () => {
    const c = data?.check;
    if (!c) return "not checked";
    if (data.backward_error) return `backward stops at line ${data.backward_error.line}`;
    if (c.first_failure) return `d${c.first_failure} wrong`;
    return c.all_written ? "all gradients match" : `${c.written} of ${c.total} written`;
  },
});

const start = await fromQuery(location.search, PRESETS);
load(start.program, start.presetId && !start.hide ? start.presetId : null);
run();
