// The program page (GET /program): a forward and a backward written as lines, run on every
// change (debounced) through POST /api/program, with the check in the backward's order, the
// shape-flow diagram, the selected name's gradient maps and training. The program lives in
// the URL (program-state.js); panes are program-editor.js, the diagram program-diagram.js,
// training program-train.js.
import * as api from "./api.js";
import { esc, h, shape } from "./format.js";
import { loadPlotly, plotlyReady } from "./plotly-ready.js";
import { CodeEditor } from "./program-editor.js";
import { drawFlow } from "./program-diagram.js";
import { checkRows, firstSelection, gradientMaps, heat, rich, states, verdictLine } from "./program-view.js";
import { fromQuery, hideLines, placeholders, queryFor } from "./program-state.js";
import { ProgramTrainer } from "./program-train.js";
import { attachFollow } from "./program-follow.js";
import { InputsForm } from "./program-inputs.js";

const $ = (id) => document.getElementById(id);
const PRESETS = JSON.parse($("program-presets").textContent);
const DEBOUNCE_MS = 300;
// "A blank start": the smallest program there is, its backward still to write
const BLANK = {
  inputs: { x: { shape: [4, 3], grad: false }, W: { shape: [3, 2] }, b: { shape: [2] } },
  forward: "h = x @ W + b\nloss = (h ** 2).sum()\n",
  backward: "dh = 2 * h\n# TODO: write dW, db\n",
  loss: "loss",
  seed: 0,
  dtype: "float32",
};
// the blank start as a preset of the page's own: `?preset=blank` while unchanged, so the menu
// keeps saying "A blank start" until the learner edits it
const STARTS = [...PRESETS, { id: "blank", title: "A blank start: write your own", request: BLANK }];

let program = null; // the POST /api/program body on screen
let presetId = null; // the preset it came from, while unchanged
let data = null; // the last answer drawn
let selected = null;
let lastFailure = null;
let lastVerdict = ""; // the verdict of the last run that worked, as text
let refusedLine = null; // {which, line, title}: the line the server refused, marked over the last run's marks
let controller = null;
let timer = 0;
let runs = 0;

const forward = new CodeEditor($("forward-editor"), { label: "Forward", onInput: (t) => edit({ forward: t }) });
const backward = new CodeEditor($("backward-editor"), { label: "Backward", onInput: (t) => edit({ backward: t }) });

function preset() {
  return STARTS.find((p) => p.id === presetId) || null;
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

// presentation mode (?present=1): code and tables large enough for a projector
let presenting = new URLSearchParams(location.search).get("present") === "1";

function present(on) {
  presenting = on;
  document.body.classList.toggle("present", on);
  $("present").setAttribute("aria-pressed", String(on));
  forward.layout();
  backward.layout();
}

async function writeURL() {
  const query = (await queryFor(program, preset())) + (presenting ? "&present=1" : "");
  if (query !== location.search) history.replaceState(null, "", `/program${query}`);
  $("preset").value = query.startsWith("?preset=") ? presetId : "";
}

function load(next, id) {
  program = next;
  presetId = id;
  forward.value = program.forward;
  backward.value = program.backward || "";
  showInputs(program.inputs, null);
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
    const body = await api.program(program, mine.signal);
    const t0 = performance.now();
    setStale(false);
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

/** A 422 at a line: shown under its pane, the line marked; anything else in the banner.
 * Either way nothing was checked: what is drawn below is the last run that worked, greyed. */
function refused(err) {
  clearLineErrors();
  const detail = err instanceof api.ApiError && Array.isArray(err.body?.detail) ? err.body.detail : [];
  const at = detail.find((d) => Array.isArray(d.loc) && ["forward", "backward"].includes(d.loc[1]) && Number.isInteger(d.loc[2]));
  const last = data ? ` <span class="stale-verdict">Showing the last run that worked (greyed): ${esc(lastVerdict)}</span>` : "";
  const what = at ? `Line ${at.loc[2]} of the ${at.loc[1]} is refused` : "The program was not run";
  setVerdict("error", `<span class="bad">✗ ${what}: nothing was checked.</span>${last}`);
  setStale(true);
  if (at) {
    showLineError(at.loc[1], at.loc[2], at.msg, at.ctx?.operands, null);
    refusedLine = { which: at.loc[1], line: at.loc[2], title: at.msg.split("\n")[0] };
    $("run-error").hidden = true;
  } else {
    const errs = api.errorsByField(err);
    if (errs.inputs) $("inputs-error").textContent = errs.inputs.join("; ");
    $("run-error").hidden = false;
    $("run-error").textContent = api.errorText(err);
    refusedLine = null;
  }
  if (data) markLines();
  else {
    forward.mark(refusedLine?.which === "forward" ? { [refusedLine.line]: { cls: "err", title: refusedLine.title } } : {});
    backward.mark(refusedLine?.which === "backward" ? { [refusedLine.line]: { cls: "err", title: refusedLine.title } } : {});
  }
}

/** The check, the flow and the maps greyed, with a note, while they are not the program's. */
function setStale(on) {
  document.body.dataset.stale = on ? "1" : "";
  $("main").classList.toggle("stale", on);
  for (const el of document.querySelectorAll(".stale-note")) el.hidden = !on;
  if (!on) refusedLine = null;
}

function clearLineErrors() {
  for (const which of ["forward", "backward"]) $(`${which}-error`).hidden = true;
  $("inputs-error").textContent = "";
  $("run-error").hidden = true;
}

/** Text with `code` spans as <code> (the server's messages quote code in backticks). */

function showLineError(which, line, message, operands, hint) {
  const box = $(`${which}-error`);
  let [head, ...rest] = String(message).split("\n");
  if (hint && head.endsWith(`; ${hint}`)) head = head.slice(0, -hint.length - 2); // said once, below
  // the message's own operand table (`  W1  [ 30  64 ]`) already shows the shapes
  const shapes = operands?.length && !rest.length
    ? h("p", { class: "shapes" }, ...operands.map((o) => h("code", {}, `${o.expr} ${shape(o.shape)}`)))
    : null;
  box.replaceChildren(...[
    h("p", {}, h("b", {}, `Line ${line}: `), ...rich(head)),
    rest.length ? h("pre", {}, rest.join("\n")) : null,
    shapes,
    hint ? h("p", { class: "hint" }, "Hint: ", ...rich(hint)) : null,
  ].filter(Boolean));
  box.dataset.line = line;
  box.hidden = false;
}

// --------------------------------------------------------------------------- drawing

function draw(answer) {
  data = answer;
  clearLineErrors();
  const newFailure = data.check.first_failure && data.check.first_failure !== lastFailure;
  lastFailure = data.check.first_failure;
  if (newFailure) selected = data.check.first_failure; // a new first failure: show it
  if (!selected || !(selected in data.tensors)) {
    selected = firstSelection(data); // the first failure, else the last parameter written
  }
  const st = states(data.check);
  const pending = placeholders(program.backward || "");
  verdict(st, pending);
  lastVerdict = $("verdict").textContent;
  table(st);
  todo(st);
  markLines();
  if (data.backward_error) {
    const e = data.backward_error;
    showLineError("backward", e.line, e.message, e.operands, e.hint);
  }
  drawFlow($("flow"), data, { states: st, selected, onSelect: select });
  fitFlow();
  maps();
  exportState();
}

/** A flow wider than its column (a GPT block: 40 names, side branches) gets the page's whole
 * width: the check and the flow stack instead of sitting side by side. */
function fitFlow() {
  const two = $("flow-card").parentElement;
  two.classList.remove("stacked");
  const flow = $("flow");
  two.classList.toggle("stacked", flow.scrollWidth > flow.clientWidth + 4);
  document.body.dataset.flow = two.classList.contains("stacked") ? "stacked" : "beside";
}

function setVerdict(kind, html) {
  const el = $("verdict");
  el.dataset.verdict = kind;
  el.innerHTML = html;
}

function verdict(st, pending) {
  setVerdict(...verdictLine(data, st, pending));
}

function table(st) {
  $("checks").tBodies[0].replaceChildren(...checkRows(data, st, selected, select));
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
  return data.forward.find((f) => f.target.split(", ").includes(name))?.line ?? null;
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
  if (refusedLine) (refusedLine.which === "forward" ? fwd : bwd)[refusedLine.line] = { cls: "err", title: refusedLine.title };
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

async function maps() {
  const name = selected;
  const g = name && data.gradients[name];
  const t = name && data.tensors[name];
  $("selected-title").textContent = name ? `Gradient of ${name}` : "Gradient";
  $("follow-box").hidden = true;
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
  const { manual, auto, difference, zmax } = gradientMaps(data, name);
  heat($("map-manual"), manual, { zmax });
  if (manual) {
    attachFollow($("map-manual"), { program: () => program, name, shape: g.shape, heatmap: manual, box: $("follow-box"),
      onLine: (line) => backward.reveal(line) });
  }
  heat($("map-autograd"), auto, { zmax });
  heat($("map-difference"), difference, { tolerance: true });
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
    const name = await api.exportFile({ program, format }, `broadprop_program.${format}`);
    $("share-status").textContent = `Saved as ${name}.`;
  } catch (err) {
    const detail = err instanceof api.ApiError && Array.isArray(err.body?.detail) ? err.body.detail : [];
    const at = detail.find((d) => Array.isArray(d.loc) && d.loc[1] === "program");
    const where = at && Number.isInteger(at.loc[3]) ? `line ${at.loc[3]} of the ${at.loc[2]}: ` : "";
    $("share-status").replaceChildren("Download failed: ", where, ...rich(at ? at.msg : api.errorText(err)));
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

/** The inputs in the form and the JSON box, except the one being typed in (`from`). */
function showInputs(inputs, from) {
  if (from !== "json") $("inputs").value = JSON.stringify(inputs, null, 1);
  if (from !== "form") inputsForm.set(inputs);
  $("inputs-summary").textContent = inputs && typeof inputs === "object" ? `(${Object.keys(inputs).length})` : "";
}
const inputsForm = new InputsForm($("inputs-form"), (inputs) => {
  $("inputs-error").textContent = "";
  showInputs(inputs, "form");
  edit({ inputs });
});
$("inputs").addEventListener("input", () => {
  try {
    const inputs = JSON.parse($("inputs").value);
    $("inputs-error").textContent = "";
    showInputs(inputs, "json");
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
  const p = STARTS.find((x) => x.id === $("preset").value);
  if (!p) return;
  load(structuredClone(p.request), p.id);
  trainer.defaults(p.train || null);
  writeURL();
  run();
});
$("exercise-link").addEventListener("click", exerciseLink);
$("present").addEventListener("click", () => (present(!presenting), writeURL()));
for (const b of document.querySelectorAll(".share [data-format]")) b.addEventListener("click", () => download(b.dataset.format));

const trainer = new ProgramTrainer({
  program: () => program,
  describe: () => {
    const c = data?.check;
    if (!c) return "not checked";
    if (data.backward_error) return `backward stops at line ${data.backward_error.line}`;
    if (c.first_failure) return `d${c.first_failure} wrong`;
    return c.all_written ? "all gradients match" : `${c.written} of ${c.total} written`;
  },
});

const start = await fromQuery(location.search, STARTS);
load(start.program, start.presetId && !start.hide ? start.presetId : null);
trainer.defaults(PRESETS.find((p) => p.id === start.presetId)?.train);
present(presenting);
run();
