// The Train panel: POST /api/train with the form's config, the formula lab's formulas and the
// panel's SGD fields, read as server-sent events; live curves appended with
// Plotly.extendTraces; Stop aborts the request (the server stops at the next step); at the
// end, w1 before and after training. Earlier runs stay on the chart, faded, each labelled by
// its gradients and settings, with their final numbers side by side in a table; a run whose
// manual gradients differed from autograd says so in a red banner; a divergence explains
// itself (an overflow is the numbers', never the formulas').
import { errorsByField, train as trainRun } from "./api.js";
import { dropDataOwned, drawUnitImages } from "./digits.js";
import { DIVERGING, SERIES } from "./colours.js";
import { h, num } from "./format.js";
import { labFromQuery } from "./lab.js";
import { loadPlotly, plotlyReady } from "./plotly-ready.js";
import { configFromForm } from "./state.js";

const $ = (id) => document.getElementById(id);
const panel = $("train-panel");
const form = $("train-form");
const startBtn = $("train-start");
const stopBtn = $("train-stop");
const bar = $("train-bar");
const statusEl = $("train-status");
const curves = $("train-curves");
const TRAIN_FIELDS = [...form.querySelectorAll("input")].map((i) => i.name);
let controller = null;
const KEEP = 6; // runs kept on the chart and in the table
let runs = []; // {n, label, gradients, settings, colour, traces: [index...], accuracy, final}
let runCount = 0;

// Boxes the panel adds under its form: the verdict banner, the divergence advice, the
// unchecked-formula warning, and the runs table.
const verdictEl = h("div", { class: "banner error", id: "train-verdict", role: "alert", hidden: true });
const divergedEl = h("div", { class: "notice bad train-diverged", id: "train-diverged", role: "status", hidden: true });
const uncheckedEl = h("p", { class: "notice bad", id: "train-unchecked", role: "status", hidden: true });
const runsEl = h("div", { id: "train-runs", hidden: true });
$("train-error").after(uncheckedEl, verdictEl, divergedEl);
curves.after(runsEl);

/** The request: the run form's config (what the page shows) plus the panel's fields. */
function request() {
  const { config } = configFromForm(document.getElementById("run-form"));
  dropDataOwned(config);
  // the learner's formulas, as the formula lab keeps them in the URL: training uses them
  const { formulas } = labFromQuery(location.search);
  if (Object.keys(formulas).length) config.formulas = formulas;
  for (const name of TRAIN_FIELDS) {
    const text = form.elements[name].value.trim();
    config[name] = text !== "" && Number.isFinite(Number(text)) ? Number(text) : text;
  }
  return config;
}

function showErrors(errs) {
  for (const name of TRAIN_FIELDS) {
    const msgs = errs[name];
    $(`terr-${name}`).textContent = msgs ? msgs.join("; ") : "";
    form.elements[name].setAttribute("aria-invalid", msgs ? "true" : "false");
  }
  // errors on run fields name them; they are in the form at the left
  const other = Object.entries(errs).filter(([k]) => !TRAIN_FIELDS.includes(k));
  const banner = $("train-error");
  banner.hidden = !other.length;
  banner.textContent = other.map(([k, m]) => (k ? `${k}: ${m.join("; ")}` : m.join("; "))).join(" ");
}

function setRunning(on) {
  startBtn.disabled = on;
  stopBtn.disabled = !on;
  panel.dataset.state = on ? "running" : panel.dataset.state === "running" ? "stopped" : panel.dataset.state || "idle";
}

/** Which gradients a run used, in words: "built-in" or the learner's formulas. */
function gradientsLabel(config) {
  const f = config.formulas || {};
  const keys = Object.keys(f);
  return keys.length ? `yours: ${keys.map((k) => `${k} = ${f[k].split("\n").pop().replace(/^\s*[\w.]+\s*=\s*/, "")}`).join("; ")}` : "built-in";
}

function settingsLabel(config) {
  return `${config.data} · ${config.init} · ${config.loss} · lr ${config.lr}${config.momentum ? ` · momentum ${config.momentum}` : ""} · ${config.steps} steps`;
}

/** A new run's curves beside the earlier ones (faded): its colour, its label in the legend. */
function newCurves(run) {
  curves.hidden = false;
  if (!curves.data) {
    Plotly.newPlot(curves, [], {
      height: 320, margin: { l: 56, r: 56, t: 10, b: 42 },
      xaxis: { title: { text: "step", font: { size: 11 } }, rangemode: "tozero" },
      yaxis: { title: { text: "loss (solid: training, dashed: validation)", font: { size: 11 } }, type: "log" },
      yaxis2: { title: { text: "validation accuracy (dotted)", font: { size: 11 } }, overlaying: "y", side: "right", range: [0, 1], dtick: 0.2, tickformat: ".0%", showgrid: false },
      legend: { orientation: "h", y: -0.22 }, paper_bgcolor: "#fff",
    }, { displayModeBar: false, responsive: true });
  }
  fontsFor = null;
  projectorFonts();
  while (runs.length >= KEEP) dropRun(runs[0]);
  if (runs.length) Plotly.restyle(curves, { opacity: 0.45, "line.width": 1.5 }, runs.flatMap((r) => r.traces));
  const name = `run ${run.n}: ${run.gradients}`;
  const line = (label, extra = {}) => ({ x: [], y: [], name: label, legendgroup: `run${run.n}`, mode: "lines+markers", marker: { size: 4 }, line: { color: run.colour, width: 2.5 }, ...extra });
  const traces = [line(name), line(`run ${run.n} validation loss`, { showlegend: false, line: { color: run.colour, width: 2.5, dash: "dash" } })];
  if (run.accuracy) traces.push(line(`run ${run.n} validation accuracy`, { showlegend: false, yaxis: "y2", line: { color: run.colour, width: 2.5, dash: "dot" } }));
  const first = curves.data.length;
  run.traces = traces.map((_, i) => first + i);
  Plotly.addTraces(curves, traces);
}

function dropRun(run) {
  Plotly.deleteTraces(curves, run.traces);
  runs = runs.filter((r) => r !== run);
  let i = 0;
  for (const r of runs) r.traces = r.traces.map(() => i++);
  fitLossAxis();
}

/** The runs side by side: what each used, and where it ended. */
function drawRuns() {
  runsEl.hidden = !runs.length;
  const acc = (r) => (r.final?.val_accuracy == null ? "–" : `${(100 * r.final.val_accuracy).toFixed(1)}%`);
  const check = (r) => (r.differed ? h("span", { class: "verdict fail" }, `✗ differed at ${r.differed} of ${r.checked}`)
    : r.checked ? h("span", { class: "verdict pass" }, r.overflowed ? `✓ matched (${r.overflowed} overflowed)` : "✓ matched") : "–");
  const end = (r) => (r.final ? `${r.final.steps}${r.final.stopped ? ` (${r.final.stopped.replace("_", " ")})` : ""}` : r.state);
  runsEl.replaceChildren(
    h("table", { class: "check train-runs" },
      h("caption", {}, "Runs compared (the newest last; earlier runs are faded on the chart)"),
      h("thead", {}, h("tr", {}, ...["run", "gradients", "settings", "steps", "final val accuracy", "final val loss", "against autograd"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, ...runs.map((r) => h("tr", { "data-run": r.n, class: r.differed ? "fail" : "" },
        h("th", { scope: "row" }, h("span", { class: "swatch", style: `background:${r.colour}` }), ` ${r.n}`),
        h("td", {}, h("code", {}, r.gradients)),
        h("td", {}, r.settings),
        h("td", { class: "n" }, end(r)),
        h("td", { class: "n acc" }, acc(r)),
        h("td", { class: "n" }, num(r.final?.val_loss)),
        h("td", {}, check(r)))))),
    h("button", { type: "button", class: "secondary small", id: "train-clear", onclick: clearRuns }, "Clear the chart"));
}

function clearRuns() {
  runs = [];
  Plotly.purge(curves);
  curves.hidden = true;
  drawRuns();
}

/** Why the loss became inf or NaN, and what to change. */
function explainDivergence(run, config, last, firstLoss) {
  const finite = run.norms; // the last finite gradient norms seen, {name: norm}, and their step
  const top = finite ? Object.entries(finite.norms).sort((a, b) => b[1] - a[1])[0] : null;
  const causes = [];
  if (config.init === "randn") causes.push(h("li", {}, "init randn: plain unscaled torch.randn weights, so every layer multiplies the size of its input by about √fan_in (√784 ≈ 28 for mnist); the outputs and their gradients start huge."));
  if (config.loss === "mse" && config.data !== "random") causes.push(h("li", {}, "mse on the digit as a number: an output far from 0..9 gives a squared error in the thousands."));
  if (config.lr >= 0.05) causes.push(h("li", {}, `lr ${config.lr}: one step of that size on gradients this large overshoots, and each step overshoots more.`));
  divergedEl.hidden = false;
  divergedEl.replaceChildren(
    h("b", {}, `Diverged at step ${last ? last.step : "?"}: the loss overflowed to inf or NaN, so training stopped. `),
    firstLoss != null ? `The loss was ${num(firstLoss)} at step 1. ` : "",
    top ? `The largest gradient before it blew up was ${top[0]}.g (‖·‖ ${num(top[1])} at step ${finite.step}). ` : "",
    "An overflow is a property of the numbers, not of the formulas: the check cannot compare inf with inf.",
    causes.length ? h("ul", {}, ...causes) : "",
    h("p", {}, "What to change: a smaller lr (try ", h("b", {}, String(config.lr / 10)), "), or kaiming init and cross-entropy. ",
      h("button", { type: "button", class: "small", id: "train-use-trains", onclick: useSettingsThatTrain }, "Use kaiming init and cross-entropy")));
}

/** Switch the run form to settings that train (main.js runs it and redraws the note). */
function useSettingsThatTrain() {
  const runForm = document.getElementById("run-form");
  runForm.elements.init.value = "kaiming";
  runForm.elements.loss.value = "cross_entropy";
  runForm.elements.init.dispatchEvent(new Event("change", { bubbles: true }));
}

/** An editor whose text is not what was last checked: training will not use that text. */
function uncheckedWarning() {
  const typed = [...document.querySelectorAll("#code-lines textarea.lab-source")]
    .filter((a) => a.value.trim() !== (a.dataset.sent || "").trim() && a.value.trim() !== "")
    .map((a) => a.dataset.key);
  uncheckedEl.hidden = !typed.length;
  uncheckedEl.textContent = typed.length
    ? `The editor for ${typed.join(", ")} holds a formula you have not checked: training uses the last checked formula (or the built-in one), not that text. Press Check in the code panel first to train with it.`
    : "";
}
document.addEventListener("input", (ev) => ev.target.matches?.("textarea.lab-source") && uncheckedWarning());
// a run drawn (the editors redrawn with what was sent): look again
// presentation mode on or off: the chart's text for a projector
new MutationObserver(() => (uncheckedWarning(), projectorFonts())).observe(document.body, { attributes: true, attributeFilter: ["data-state", "class"] });

let fontsFor = null;
function projectorFonts() {
  const big = document.body.classList.contains("present");
  if (!curves.data || fontsFor === big) return;
  fontsFor = big;
  const size = big ? 18 : 11;
  Plotly.relayout(curves, { font: { size: big ? 18 : 12 }, "xaxis.title.font.size": size, "yaxis.title.font.size": size, "yaxis2.title.font.size": size });
}

// Points wait for the next frame and go to Plotly together: a fast training sends hundreds of
// events a second, and one redraw each would keep the browser busy drawing and nothing else.
let pending = [];
let frame = 0;

function addPoint(p, run) {
  pending.push([p, run]);
  if (!frame) frame = requestAnimationFrame(flushPoints);
}

function flushPoints() {
  cancelAnimationFrame(frame);
  frame = 0;
  if (!pending.length) return;
  const run = pending[0][1];
  const accuracy = run.accuracy;
  const points = pending.map(([p]) => p);
  pending = [];
  const xs = [points.map((p) => p.step), points.map((p) => p.step)];
  const ys = [points.map((p) => p.loss), points.map((p) => p.val_loss)];
  if (accuracy) (xs.push(points.map((p) => p.step)), ys.push(points.map((p) => p.val_accuracy)));
  Plotly.extendTraces(curves, { x: xs, y: ys }, run.traces);
  fitLossAxis();
}

/** The loss axis over every run's losses up to 100x its first: a run that diverges (1e30)
 * leaves through the top instead of flattening the others to a line at the bottom. */
function fitLossAxis() {
  let lo = Infinity;
  let hi = -Infinity;
  for (const r of runs) {
    const ys = r.traces.slice(0, 2).flatMap((i) => curves.data[i]?.y || []).filter((v) => v != null && v > 0 && Number.isFinite(v));
    if (!ys.length) continue;
    const cap = 100 * Math.max(...ys.slice(0, 2));
    for (const v of ys) if (v <= cap) (lo = Math.min(lo, v), hi = Math.max(hi, v));
  }
  if (hi < lo) return;
  const range = [Math.log10(lo) - 0.15, Math.log10(hi) + 0.15];
  const now = curves.layout?.yaxis?.range;
  if (now && Math.abs(now[0] - range[0]) < 0.02 && Math.abs(now[1] - range[1]) < 0.02) return; // one redraw, not two, per frame
  Plotly.relayout(curves, { "yaxis.range": range });
}

function progressText(p, steps) {
  const left = p.steps_per_s > 0 ? (steps - p.step) / p.steps_per_s : null;
  const eta = left == null ? "" : left < 1 ? " · ETA < 1 s" : ` · ETA ${Math.ceil(left)} s`;
  const acc = p.val_accuracy == null ? "" : ` · val accuracy ${(100 * p.val_accuracy).toFixed(1)}%`;
  const check = p.overflow ? "overflowed: inf or NaN, nothing to compare" : p.all_close ? "gradients match autograd" : `✗ gradients differ from autograd (max rel err ${num(p.max_rel_err)})`;
  return `step ${p.step} / ${steps} · loss ${num(p.loss, 4)}${acc} · ${Math.round(p.steps_per_s)} steps/s${eta} · ${check}`;
}

function drawWeights(done) {
  const box = $("train-weights");
  box.hidden = false;
  for (const [id, view] of [["train-w1-before", done.weights_before.w1], ["train-w1-after", done.weights.w1]]) {
    const el = $(id);
    if (view.images) {
      drawUnitImages(el, view.images, view.image_shape, { title: "w1" });
    } else {
      const z = view.heatmap.z;
      const zmax = Math.max(1e-30, ...z.flat().filter((v) => v != null).map(Math.abs));
      Plotly.newPlot(el, [{ type: "heatmap", z, zmid: 0, zmin: -zmax, zmax, colorscale: DIVERGING }],
        { width: 360, height: 300, margin: { l: 40, r: 10, t: 8, b: 30 }, yaxis: { autorange: "reversed" } },
        { displayModeBar: false });
    }
  }
}

async function start() {
  const config = request();
  controller?.abort();
  const mine = (controller = new AbortController());
  showErrors({});
  setRunning(true);
  bar.max = config.steps || 1;
  bar.value = 0;
  statusEl.textContent = "Starting…";
  $("train-weights").hidden = true;
  verdictEl.hidden = true;
  divergedEl.hidden = true;
  uncheckedWarning();
  const run = {
    n: ++runCount, gradients: gradientsLabel(config), colour: SERIES[(runCount - 1) % SERIES.length],
    settings: settingsLabel(config),
    traces: [], accuracy: null, final: null, differed: 0, checked: 0, overflowed: 0, norms: null, state: "running",
  };
  let last = null;
  let firstLoss = null;
  try {
    if (!window.Plotly) (loadPlotly(), await plotlyReady); // the curves need it
    const answer = await trainRun(config, mine.signal);
    for await (const { event, data } of answer) {
      if (event === "progress") {
        if (run.accuracy === null) {
          run.accuracy = data.val_accuracy != null;
          pending = [];
          newCurves(run);
          runs.push(run);
          drawRuns();
        }
        addPoint(data, run);
        bar.value = data.step;
        statusEl.textContent = progressText(data, bar.max);
        panel.dataset.step = data.step;
        // an overflow (inf or NaN on either side) is the numbers', not the formulas'
        run.checked += 1;
        if (data.overflow) run.overflowed += 1;
        else if (!data.all_close) run.differed += 1;
        if (!data.overflow && data.grad_norms && Object.values(data.grad_norms).every((v) => v != null)) run.norms = { step: data.step, norms: data.grad_norms };
        if (firstLoss == null) firstLoss = data.batch_loss ?? data.loss;
        if (run.differed) showVerdict(run, data);
        last = data;
      } else if (event === "done") {
        flushPoints();
        const why = data.stopped ? ` (stopped: ${data.stopped.replace("_", " ")})` : "";
        const acc = data.val_accuracy == null ? "" : ` · val accuracy ${(100 * data.val_accuracy).toFixed(1)}%`;
        const bad = run.differed ? ` ✗ The manual gradients differed from autograd at ${run.differed} of the checked steps.` : "";
        statusEl.textContent = `Done: ${data.steps} steps in ${data.seconds.toFixed(1)} s${acc}${why}.${bad}`;
        panel.dataset.differed = run.differed;
        panel.dataset.valAccuracy = data.val_accuracy ?? "";
        run.final = data;
        run.state = "done";
        drawRuns();
        if (data.stopped === "diverged") explainDivergence(run, config, last, firstLoss);
        drawWeights(data);
        panel.dataset.state = "done";
      } else if (event === "error") {
        showErrors({ "": [data.detail] });
      }
    }
  } catch (err) {
    if (err.name === "AbortError") {
      flushPoints();
      run.state = `stopped at ${last ? last.step : 0}`;
      drawRuns();
      statusEl.textContent = `Stopped at step ${last ? last.step : 0}.`;
      panel.dataset.state = "stopped";
      return;
    }
    showErrors(errorsByField(err));
    statusEl.textContent = "Not started.";
    panel.dataset.state = "error";
  } finally {
    if (controller === mine) (controller = null, startBtn.disabled = false, stopBtn.disabled = true);
  }
}

/** The red banner: this run's manual gradients are not autograd's. */
function showVerdict(run, p) {
  verdictEl.hidden = false;
  verdictEl.replaceChildren(
    h("b", {}, `✗ Run ${run.n}: the manual gradients differed from autograd at ${run.differed} of ${run.checked} checked steps`),
    ` (max rel err ${num(p.max_rel_err)} at step ${p.step}). This run trains on wrong gradients: ${run.gradients}. Fix the formula in the code panel; its curve may still fall, which does not make it right.`);
}

form.addEventListener("submit", (ev) => (ev.preventDefault(), start()));
stopBtn.addEventListener("click", () => controller?.abort());
panel.dataset.state = "idle";
