// Training a program with its own backward (POST /api/program/train), read as server-sent
// events: live train and val curves (points batched into one Plotly.extendTraces per animation
// frame, as train.js does), sampled names as they come, and each training kept on the chart
// beside the earlier ones, labelled, so a wrong backward's curve sits next to a right one's.
import * as api from "./api.js";
import { SERIES } from "./colours.js";
import { esc, num } from "./format.js";
import { loadPlotly, plotlyReady } from "./plotly-ready.js";

const $ = (id) => document.getElementById(id);
const FIELDS = ["steps", "batch", "lr", "seed"];

export class ProgramTrainer {
  /** `program()`: the program on screen (a POST /api/program body); `describe()`: a short
   * label of its backward's verdict, for the curve's name. */
  constructor({ program, describe }) {
    this.program = program;
    this.describe = describe;
    this.panel = $("train-panel");
    this.form = $("train-form");
    this.curves = $("train-curves");
    this.status = $("train-status");
    this.bar = $("train-bar");
    this.runs = 0;
    this.controller = null;
    this.pending = [];
    this.frame = 0;
    this.form.addEventListener("submit", (ev) => (ev.preventDefault(), this.start()));
    $("train-stop").addEventListener("click", () => this.controller?.abort());
    $("train-clear").addEventListener("click", () => this.clear());
  }

  request() {
    const body = { program: this.program() };
    for (const name of FIELDS) {
      const text = this.form.elements[name].value.trim();
      body[name] = text !== "" && Number.isFinite(Number(text)) ? Number(text) : text;
    }
    return body;
  }

  /** The form's fields from a preset's `train` defaults (the page's own defaults otherwise). */
  defaults(train) {
    for (const name of FIELDS) {
      const el = this.form.elements[name];
      if (!el.dataset.initial) el.dataset.initial = el.value;
      el.value = train && train[name] != null ? train[name] : el.dataset.initial;
    }
  }

  clear() {
    if (window.Plotly) Plotly.purge(this.curves);
    this.curves.dataset.runs = "0";
    this.runs = 0;
  }

  /** Two traces for this training (train, val), added to the chart. */
  addTraces(label) {
    const colour = SERIES[this.runs % SERIES.length];
    this.runs += 1;
    const run = this.runs;
    const line = (name, dash, width) => ({ x: [], y: [], name, mode: "lines", line: { color: colour, width, dash } });
    const traces = [line(`#${run} train · ${label}`, "solid", 1.2), { ...line(`#${run} val · ${label}`, "dot", 2.5), mode: "lines+markers", marker: { size: 5 } }];
    if (!this.curves.data || !this.curves.data.length) {
      Plotly.newPlot(this.curves, traces, {
        height: 320, margin: { l: 52, r: 12, t: 8, b: 40 },
        xaxis: { title: { text: "step", font: { size: 11 } }, rangemode: "tozero" },
        yaxis: { title: { text: "loss", font: { size: 11 } } },
        legend: { orientation: "h", y: -0.22, font: { size: 11 } }, paper_bgcolor: "#fff",
      }, { displayModeBar: false, responsive: true });
    } else {
      Plotly.addTraces(this.curves, traces);
    }
    this.curves.dataset.runs = String(run);
    const n = this.curves.data.length;
    return [n - 2, n - 1];
  }

  addPoint(traces, p) {
    this.pending.push([traces, p]);
    if (!this.frame) this.frame = requestAnimationFrame(() => this.flush());
  }

  flush() {
    cancelAnimationFrame(this.frame);
    this.frame = 0;
    if (!this.pending.length) return;
    const [traces] = this.pending[0];
    const points = this.pending.map(([, p]) => p);
    this.pending = [];
    const val = points.filter((p) => p.val_loss != null);
    Plotly.extendTraces(this.curves, { x: [points.map((p) => p.step), val.map((p) => p.step)], y: [points.map((p) => p.loss), val.map((p) => p.val_loss)] }, traces);
  }

  showAccuracy(accuracy, when) {
    $("accuracy-box").hidden = false;
    $("accuracy").textContent = `${(100 * accuracy).toFixed(1)}%`;
    $("accuracy-when").textContent = `of the held-out images, ${when}`;
    this.panel.dataset.accuracy = accuracy.toFixed(4);
  }

  showSamples(names, when) {
    if (!names) return;
    $("samples-box").hidden = false;
    $("samples-when").textContent = when;
    $("samples").replaceChildren(...names.map((s) => Object.assign(document.createElement("li"), { textContent: s || "(empty)" })));
  }

  setRunning(on) {
    $("train-start").disabled = on;
    $("train-stop").disabled = !on;
    this.panel.dataset.state = on ? "running" : this.panel.dataset.state;
  }

  error(text) {
    const banner = $("train-error");
    banner.hidden = !text;
    banner.textContent = text || "";
  }

  async start() {
    const body = this.request();
    this.controller?.abort();
    const mine = (this.controller = new AbortController());
    this.error("");
    this.setRunning(true);
    this.bar.max = body.steps || 1;
    this.bar.value = 0;
    this.status.textContent = "Starting…";
    let last = null;
    try {
      if (!window.Plotly) (loadPlotly(), await plotlyReady);
      const answer = await api.trainProgram(body, mine.signal);
      const traces = this.addTraces(this.describe());
      for await (const { event, data } of answer) {
        if (event === "step") {
          this.addPoint(traces, data);
          this.bar.value = data.step;
          const val = (data.val_loss == null ? "" : ` · val loss ${num(data.val_loss, 4)}`)
            + (data.val_accuracy == null ? "" : ` · val accuracy ${(100 * data.val_accuracy).toFixed(1)}%`);
          if (data.val_accuracy != null) this.showAccuracy(data.val_accuracy, `at step ${data.step}`);
          this.status.textContent = `step ${data.step} / ${body.steps} · loss ${num(data.loss, 4)}${val} · ${Math.round(data.steps_per_s)} steps/s`;
          if (data.samples) this.showSamples(data.samples, `at step ${data.step}`);
          this.panel.dataset.step = data.step;
          last = data;
        } else if (event === "done") {
          this.flush();
          this.done(data);
        } else if (event === "error") {
          this.error(data.detail);
          this.panel.dataset.state = "error";
        }
      }
    } catch (err) {
      if (err.name === "AbortError") {
        this.flush();
        this.status.textContent = `Stopped at step ${last ? last.step : 0}.`;
        this.panel.dataset.state = "stopped";
        return;
      }
      this.error(api.errorText(err));
      this.status.textContent = "Not started.";
      this.panel.dataset.state = "error";
    } finally {
      if (this.controller === mine) (this.controller = null, $("train-start").disabled = false, $("train-stop").disabled = true);
    }
  }

  done(data) {
    const why = data.stopped ? ` (stopped: ${data.stopped.replace("_", " ")})` : "";
    const losses = data.val_loss != null
      ? `train loss ${num(data.train_loss, 4)} · val loss ${num(data.val_loss, 4)}`
        + (data.val_accuracy != null ? ` · val accuracy ${(100 * data.val_accuracy).toFixed(1)}%` : "")
      : `loss ${num(data.loss, 4)}`;
    if (data.val_accuracy != null) this.showAccuracy(data.val_accuracy, `after ${data.steps} steps`);
    const fixed = data.fixed.length
      ? ` Held fixed: ${data.fixed.map((n) => `${n} (${data.fixed_why[n]})`).join("; ")}.`
      : "";
    this.status.innerHTML = `Done: ${data.steps} steps in ${data.seconds.toFixed(1)} s · ${esc(losses)}${esc(why)}.<span class="fixed">${esc(fixed)}</span>`;
    this.showSamples(data.samples, `after ${data.steps} steps`);
    this.panel.dataset.fixed = data.fixed.join(",");
    this.panel.dataset.state = "done";
  }
}
