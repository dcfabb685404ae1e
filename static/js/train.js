// The Train panel: POST /api/train with the form's config, the formula lab's formulas and the
// panel's SGD fields, read as server-sent events; live curves appended with
// Plotly.extendTraces; Stop aborts the request (the server stops at the next step); at the
// end, w1 before and after training.
import { ApiError, errorsByField } from "./api.js";
import { dropDataOwned, drawUnitImages } from "./digits.js";
import { num } from "./format.js";
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

/** Server-sent events from a fetch body: yields {event, data} as each one completes. */
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
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

function newCurves(accuracy) {
  curves.hidden = false;
  Plotly.purge(curves);
  const line = (name, color, extra = {}) => ({ x: [], y: [], name, mode: "lines+markers", marker: { size: 4 }, line: { color, width: 2 }, ...extra });
  const traces = [line("training loss", "#1c7ed6"), line("validation loss", "#f08c00")];
  if (accuracy) traces.push(line("validation accuracy", "#2f9e44", { yaxis: "y2", line: { color: "#2f9e44", width: 2, dash: "dot" } }));
  Plotly.newPlot(curves, traces, {
    height: 300, margin: { l: 56, r: accuracy ? 56 : 16, t: 10, b: 42 },
    xaxis: { title: { text: "step", font: { size: 11 } }, rangemode: "tozero" },
    yaxis: { title: { text: "loss", font: { size: 11 } }, type: "log" },
    yaxis2: { title: { text: "validation accuracy", font: { size: 11 } }, overlaying: "y", side: "right", range: [0, 1], dtick: 0.2, tickformat: ".0%", showgrid: false },
    legend: { orientation: "h", y: 1.12 }, paper_bgcolor: "#fff",
  }, { displayModeBar: false, responsive: true });
}

// Points wait for the next frame and go to Plotly together: a fast training sends hundreds of
// events a second, and one redraw each would keep the browser busy drawing and nothing else.
let pending = [];
let frame = 0;

function addPoint(p, accuracy) {
  pending.push([p, accuracy]);
  if (!frame) frame = requestAnimationFrame(flushPoints);
}

function flushPoints() {
  cancelAnimationFrame(frame);
  frame = 0;
  if (!pending.length) return;
  const accuracy = pending[0][1];
  const points = pending.map(([p]) => p);
  pending = [];
  const xs = [points.map((p) => p.step), points.map((p) => p.step)];
  const ys = [points.map((p) => p.loss), points.map((p) => p.val_loss)];
  if (accuracy) (xs.push(points.map((p) => p.step)), ys.push(points.map((p) => p.val_accuracy)));
  Plotly.extendTraces(curves, { x: xs, y: ys }, accuracy ? [0, 1, 2] : [0, 1]);
}

function progressText(p, steps) {
  const left = p.steps_per_s > 0 ? (steps - p.step) / p.steps_per_s : null;
  const eta = left == null ? "" : left < 1 ? " · ETA < 1 s" : ` · ETA ${Math.ceil(left)} s`;
  const acc = p.val_accuracy == null ? "" : ` · val accuracy ${(100 * p.val_accuracy).toFixed(1)}%`;
  const check = p.all_close ? "gradients match autograd" : `✗ gradients differ from autograd (max rel err ${num(p.max_rel_err)})`;
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
      Plotly.newPlot(el, [{ type: "heatmap", z, zmid: 0, zmin: -zmax, zmax, colorscale: "RdBu", reversescale: true }],
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
  let last = null;
  try {
    if (!window.Plotly) (loadPlotly(), await plotlyReady); // the curves need it
    const res = await fetch("/api/train", {
      method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify(config), signal: mine.signal,
    });
    if (!res.ok) {
      let body = null;
      try { body = await res.json(); } catch { body = null; }
      throw new ApiError(res.status, body, res.headers.get("Retry-After"));
    }
    let accuracy = null;
    let differed = 0;  // progress events whose manual gradients failed the check
    for await (const { event, data } of events(res.body)) {
      if (event === "progress") {
        if (accuracy === null) (accuracy = data.val_accuracy != null, (pending = []), newCurves(accuracy));
        addPoint(data, accuracy);
        bar.value = data.step;
        statusEl.textContent = progressText(data, bar.max);
        panel.dataset.step = data.step;
        differed += data.all_close ? 0 : 1;
        last = data;
      } else if (event === "done") {
        flushPoints();
        const why = data.stopped ? ` (stopped: ${data.stopped.replace("_", " ")})` : "";
        const acc = data.val_accuracy == null ? "" : ` · val accuracy ${(100 * data.val_accuracy).toFixed(1)}%`;
        const bad = differed ? ` ✗ The manual gradients differed from autograd at ${differed} of the checked steps.` : "";
        statusEl.textContent = `Done: ${data.steps} steps in ${data.seconds.toFixed(1)} s${acc}${why}.${bad}`;
        panel.dataset.differed = differed;
        drawWeights(data);
        panel.dataset.state = "done";
      } else if (event === "error") {
        showErrors({ "": [data.detail] });
      }
    }
  } catch (err) {
    if (err.name === "AbortError") {
      flushPoints();
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

form.addEventListener("submit", (ev) => (ev.preventDefault(), start()));
stopBtn.addEventListener("click", () => controller?.abort());
panel.dataset.state = "idle";
