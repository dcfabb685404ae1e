// Wires the page: URL -> form -> POST /api/run -> diagram, step-through, heatmaps, checks.
import { errorsByField, run } from "./api.js";
import { drawChecks } from "./checks.js";
import { Diagram } from "./diagram.js";
import { Explainer } from "./explainer.js";
import { bytes, h, num } from "./format.js";
import { drawHeatmaps, VIEWS } from "./heatmaps.js";
import { Lab } from "./lab.js";
import { configFromForm, configFromQuery, configToForm, FIELDS, queryFromConfig } from "./state.js";
import { Stepper } from "./stepper.js";

const $ = (id) => document.getElementById(id);
const form = $("run-form");
const main = $("main");
let current = null; // the last response drawn
let controller = null;
let view = "manual";

const diagram = new Diagram($("diagram"), (i) => stepper.select(i));
const explainer = new Explainer($("explainer-form"), $("explainer-out"));
const stepper = new Stepper({
  codeEl: $("code-lines"), detailEl: $("step-detail"), posEl: $("step-pos"),
  prevBtn: $("step-prev"), nextBtn: $("step-next"),
  onSelect: (i) => diagram.highlight(i),
  onExplain: (a, b) => explainer.show(a, b),
  decorate: (li, entry) => lab.decorate(li, entry),
});
const lab = new Lab({ barEl: $("lab-bar"), onCheck: () => fromForm() });

function showErrors(errs) {
  for (const f of FIELDS) {
    const msgs = errs[f.name];
    $(`err-${f.name}`).textContent = msgs ? msgs.join("; ") : "";
    form.elements[f.name].setAttribute("aria-invalid", msgs ? "true" : "false");
    form.elements[f.name].closest(".field").classList.toggle("invalid", !!msgs);
  }
  const banner = $("run-error");
  const named = FIELDS.filter((f) => errs[f.name]).map((f) => f.name);
  const lines = [...(errs[""] || [])];
  if (named.length) lines.push(`The server refused this config: see ${named.join(", ")} in the form.${current ? " The charts show the last run that worked." : ""}`);
  banner.hidden = !lines.length;
  banner.textContent = lines.join(" ");
}

function setLoading(on) {
  $("loading").hidden = !on;
  main.classList.toggle("busy", on);
  main.setAttribute("aria-busy", on ? "true" : "false");
  document.body.dataset.state = on ? "loading" : current ? "ready" : "empty";
}

function summary(data) {
  const biggest = Math.max(0, ...data.backward.flatMap((b) => b.steps.filter((s) => s.broadcast).map((s) => s.bytes)));
  const t = data.timing;
  $("summary").replaceChildren(
    h("span", {}, "loss ", h("b", {}, num(data.loss, 6))),
    h("span", { class: data.check.all_close ? "ok" : "bad" }, data.check.all_close ? "✓ all gradients match autograd" : "✗ a gradient differs from autograd"),
    biggest ? h("span", {}, "largest broadcast intermediate ", h("b", {}, bytes(biggest))) : null,
    h("span", { class: "muted" }, `forward ${t.forward_ms.toFixed(0)} ms · backward ${t.backward_ms.toFixed(0)} ms · check ${t.check_ms.toFixed(0)} ms`),
  );
}

function setView(next) {
  view = Object.hasOwn(VIEWS, next) ? next : "manual";
  document.querySelector(`input[name="grad-view"][value="${view}"]`).checked = true;
}

function draw(response) {
  const data = lab.redact(response); // an exercise's hidden formulas never reach the DOM
  current = data;
  main.classList.remove("empty");
  summary(data);
  diagram.draw(data);
  stepper.load(data, diagram.steps);
  setView(view);
  drawHeatmaps($("heatmaps"), data, view);
  drawChecks($("check"), data);
  lab.drawn();
}

/** Run a config (what the form or URL says) and draw it; a newer run cancels an older one. */
let lastSent = null;
async function go(config, withLab = true) {
  if (withLab) (config = { ...config, ...lab.request() }), lab.clearError();
  const key = JSON.stringify(config);
  if (key === lastSent && controller && !controller.signal.aborted && document.body.dataset.state === "loading") return;
  lastSent = key;
  controller?.abort();
  const mine = (controller = new AbortController());
  showErrors({});
  setLoading(true);
  try {
    const data = await run(config, mine.signal);
    configToForm(form, data.config);
    draw(data);
  } catch (err) {
    if (err.name === "AbortError") return;
    // a formula's 422 is shown at the formula; with nothing drawn yet, draw the reference run
    if (withLab && lab.failed(err)) {
      if (!current) go({ ...config, formulas: undefined }, false);
      return;
    }
    showErrors(errorsByField(err));
  } finally {
    if (controller === mine) setLoading(false);
  }
}

function fromForm() {
  const { config, unreadable } = configFromForm(form);
  const query = lab.query(queryFromConfig(config));
  if (query !== location.search) history.pushState(null, "", `${location.pathname}${query}`);
  if (unreadable.length) {
    showErrors(Object.fromEntries(unreadable.map((n) => [n, ["not a number"]])));
    return;
  }
  go(config);
}

function fromUrl() {
  const config = configFromQuery(location.search);
  lab.fromQuery(location.search);
  configToForm(form, config);
  go(config);
}

form.addEventListener("submit", (ev) => (ev.preventDefault(), fromForm()));
form.addEventListener("change", () => fromForm());
$("reset-button").addEventListener("click", () => (configToForm(form, {}), fromForm()));
window.addEventListener("popstate", fromUrl);
for (const input of document.querySelectorAll('input[name="grad-view"]')) {
  input.addEventListener("change", () => {
    if (!current) return;
    setView(input.value);
    drawHeatmaps($("heatmaps"), current, view);
  });
}
document.addEventListener("keydown", (ev) => {
  if (ev.altKey || ev.ctrlKey || ev.metaKey) return;
  if (ev.target.closest("input, select, textarea")) return;
  if (ev.key === "ArrowRight" || ev.key === "ArrowLeft") {
    ev.preventDefault();
    stepper.move(ev.key === "ArrowRight" ? 1 : -1);
  }
});
let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => current && (diagram.draw(current), diagram.highlight(stepper.index)), 200);
});

fromUrl();
explainer.update();
