// Wires the page: URL -> form -> POST /api/run -> diagram, step-through, heatmaps, checks.
// The run's request starts first, before Plotly's bundle is parsed (it loads deferred, after
// this module); everything but the heatmaps is drawn without Plotly.
import { errorsByField, run } from "./api.js";
import { configFromForm, configFromQuery, configToForm, FIELDS, pageFromQuery, queryFromConfig, toJSON } from "./state.js";

const initial = { config: configFromQuery(location.search), page: pageFromQuery(location.search) };
let controller = new AbortController();
performance.mark("bp:run-start");
// in flight while the rest loads (a link with lab formulas waits for the lab to read them)
const early = /(^|[?&])(f\.[^=&]+\.g|hide)=/.test(location.search) ? null : run(initial.config, controller.signal);

const [{ drawChecks }, { Diagram, legend, repeatsNote, strategyNote }, { Explainer }, { bytes, h, num }, { Heatmaps, VIEWS },
  { Stepper }, { Presenter }, { ExportButtons }, { Lab }, { drawDataPanel, dropDataOwned }, { FollowPanel, cellRequest, followNote }] =
  await Promise.all([import("./checks.js"), import("./diagram.js"), import("./explainer.js"), import("./format.js"),
    import("./heatmaps.js"), import("./stepper.js"), import("./present.js"), import("./export.js"), import("./lab.js"),
    import("./digits.js"), import("./follow.js")]);

const $ = (id) => document.getElementById(id);
const form = $("run-form");
const main = $("main");
let current = null; // the last response drawn
let currentSent = null; // the config that produced it, as sent (exact seeds)
let view = VIEWS[initial.page.view] ? initial.page.view : "manual";
let cells = initial.page.cells === "mean" ? "mean" : "extreme";
let wantedStep = initial.page.step || null; // "x:3": the step the URL asks for

const diagram = new Diagram($("diagram"), (i) => stepper.select(i), $("diagram-tip"));
const explainer = new Explainer($("explainer-form"), $("explainer-out"));
const exporter = new ExportButtons(document.querySelectorAll("#export-actions button"), $("export-status"));
const stepper = new Stepper({
  codeEl: $("code-lines"), detailEl: $("step-detail"), posEl: $("step-pos"),
  prevBtn: $("step-prev"), nextBtn: $("step-next"), mathEl: $("step-math"),
  onSelect: (i, auto) => {
    diagram.highlight(i);
    if (auto) return; // the page's own choice (a new run): the URL keeps what it asked for
    wantedStep = stepper.id(i);
    syncUrl(true);
  },
  onExplain: (a, b) => explainer.show(a, b),
  decorate: (li, entry) => lab.decorate(li, entry), // the formula lab's tools on each line
  numbers: initial.page.numbers !== "0",
});
const lab = new Lab({ barEl: $("lab-bar"), onCheck: () => fromForm() });
const follower = new FollowPanel({
  el: $("follow-panel"),
  onChange: () => syncUrl(true),
  onMark: (follow) => {
    diagram.markFollow(follow);
    exporter.follow = follow ? { grad: follow.grad, index: follow.index } : null;
    $("diagram-follow").hidden = !follow;
    $("diagram-follow").replaceChildren(...(follow ? followNote(follow) : []));
  },
});
follower.set(initial.page.follow);
const heatmaps = new Heatmaps($("heatmaps"), (onScreen, all) => {
  document.body.dataset.pending = String(onScreen);
  document.body.dataset.pendingAll = String(all);
  if (!onScreen && current) performance.mark("bp:drawn");
}, (name, g, hm, row, col) => {
  if (!currentSent) return;
  follower.pick(cellRequest(name, g.shape, hm, row, col), currentSent);
  follower.el.scrollIntoView({ block: "nearest", behavior: "smooth" });
});
const presenter = new Presenter({
  toggle: $("present-toggle"), drawerToggle: $("config-toggle"),
  onChange: () => {
    diagram.scale = presenter.on ? 1.6 : 1;
    if (current) (diagram.draw(current), diagram.highlight(stepper.index));
    follower.redraw();
    syncUrl(true);
  },
  onKey: (delta) => stepper.move(delta),
});

/** The page state that goes in the URL beside the config. */
function pageState() {
  return {
    step: wantedStep,
    view: view === "manual" ? null : view,
    cells: cells === "extreme" ? null : cells,
    present: presenter.on ? "1" : null,
    numbers: stepper.numbers ? null : "0",
    follow: follower.param,
  };
}

/** Keep the URL in step with what is shown (replace: no history entry for a step). */
function syncUrl(replace) {
  const { config } = configFromForm(form);
  const query = lab.query(queryFromConfig(currentSent || config, pageState()));
  if (query === location.search) return;
  history[replace ? "replaceState" : "pushState"](null, "", `${location.pathname}${query}`);
}

function showErrors(errs, changed = []) {
  // a config over the memory budget or the work limit: the server names the field to shrink;
  // the field the user just changed gets the message too, as that is where they look
  const limits = errs["@limits"] || [];
  for (const name of changed) if (limits.length && !errs[name]) errs[name] = limits;
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
  if (named.length) presenter.openDrawer();
}

function setLoading(on) {
  $("loading").hidden = !on;
  main.classList.toggle("busy", on);
  main.setAttribute("aria-busy", on ? "true" : "false");
  document.body.dataset.state = on ? "loading" : current ? "ready" : "empty";
}

/** "0.43 ms" below 10 ms, else whole ms: a small run is not "0 ms". */
const ms = (x) => (x < 10 ? `${x.toPrecision(2)} ms` : `${x.toFixed(0)} ms`);

function summary(data) {
  const broadcastForm = data.config.strategy === "broadcast";
  const biggest = Math.max(0, ...data.backward.flatMap((b) => b.steps.filter((s) => s.broadcast).map((s) => s.bytes)));
  const t = data.timing;
  $("summary").replaceChildren(...[
    h("span", {}, "loss ", h("b", {}, num(data.loss, 6))),
    h("span", { class: data.check.all_close ? "ok" : "bad" }, data.check.all_close ? "✓ all gradients match autograd" : "✗ a gradient differs from autograd"),
    biggest && broadcastForm ? h("span", {}, "largest broadcast intermediate ", h("b", {}, bytes(biggest))) : null,
    !broadcastForm ? h("span", {}, "strategy ", h("b", {}, data.config.strategy), ": no broadcast intermediate") : null,
    h("span", { class: "muted" }, `forward ${ms(t.forward_ms)} · backward ${ms(t.backward_ms)} · check ${ms(t.check_ms)}`),
  ].filter(Boolean));
}

function setView(next) {
  view = Object.hasOwn(VIEWS, next) ? next : "manual";
  document.querySelector(`input[name="grad-view"][value="${view}"]`).checked = true;
  document.querySelector(`input[name="grad-cells"][value="${cells}"]`).checked = true;
}

function draw(response) {
  const data = lab.redact(response); // an exercise's hidden formulas never reach the DOM
  current = data;
  main.classList.remove("empty");
  summary(data);
  diagram.draw(data);
  $("diagram-legend").replaceChildren(...legend(data));
  $("diagram-notes").replaceChildren(...[strategyNote(data), repeatsNote(data)].filter(Boolean));
  stepper.load(data, diagram.steps, wantedStep);
  setView(view);
  heatmaps.update(data, view, cells);
  drawChecks($("check"), data);
  lab.drawn();
  exporter.load(data, lab.hidden);
  drawDataPanel($("data-panel"), data);
}

/** Run a config (what the form or URL says) and draw it; a newer run cancels an older one. */
let lastSent = null;
async function go(config, pending = null, withLab = true) {
  if (withLab) (config = { ...config, ...lab.request() }), lab.clearError();
  const key = toJSON(config);
  if (!pending && key === lastSent && document.body.dataset.state === "loading") return;
  const changed = currentSent ? FIELDS.map((f) => f.name).filter((n) => toJSON(config[n]) !== toJSON(currentSent[n])) : [];
  lastSent = key;
  if (!pending) {
    controller.abort();
    controller = new AbortController();
    performance.mark("bp:run-start");
  }
  const mine = controller;
  showErrors({});
  setLoading(true);
  try {
    const data = await (pending || run(config, mine.signal));
    if (controller !== mine) return;
    performance.mark("bp:response");
    currentSent = config;
    // the form shows what was sent (exact, even for seeds past 2^53), the server's defaults for the rest
    configToForm(form, { ...data.config, ...config });
    draw(data);
    follower.load(config); // the followed element, in this run
    syncUrl(true);
  } catch (err) {
    if (err.name === "AbortError") return;
    // a formula's 422 is shown at the formula; with nothing drawn yet, draw the reference run
    if (withLab && lab.failed(err)) {
      if (!current) go({ ...config, formulas: undefined }, null, false);
      return;
    }
    showErrors(errorsByField(err), changed);
  } finally {
    if (controller === mine) setLoading(false);
  }
}

function fromForm() {
  const { config, unreadable } = configFromForm(form);
  dropDataOwned(config);
  const query = lab.query(queryFromConfig(config, pageState()));
  if (query !== location.search) history.pushState(null, "", `${location.pathname}${query}`);
  if (unreadable.length) {
    showErrors(Object.fromEntries(unreadable.map((n) => [n, ["not a number"]])));
    return;
  }
  go(config);
}

function fromUrl() {
  const config = configFromQuery(location.search);
  const page = pageFromQuery(location.search);
  wantedStep = page.step || null;
  view = VIEWS[page.view] ? page.view : "manual";
  follower.set(page.follow);
  lab.fromQuery(location.search);
  configToForm(form, config);
  go(config);
}

form.addEventListener("submit", (ev) => (ev.preventDefault(), fromForm()));
form.addEventListener("change", () => fromForm());
$("reset-button").addEventListener("click", () => (configToForm(form, {}), fromForm()));
window.addEventListener("popstate", fromUrl);
for (const input of document.querySelectorAll('input[name="grad-view"], input[name="grad-cells"]')) {
  input.addEventListener("change", () => {
    if (!current) return;
    if (input.name === "grad-view") setView(input.value);
    else cells = input.value;
    heatmaps.update(current, view, cells);
    syncUrl(true);
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
let lastWidth = window.innerWidth;
window.addEventListener("resize", () => {
  if (window.innerWidth === lastWidth) return;
  lastWidth = window.innerWidth;
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => current && (diagram.draw(current), diagram.highlight(stepper.index), heatmaps.update(current, view, cells)), 200);
});

presenter.set(initial.page.present === "1");
diagram.scale = presenter.on ? 1.6 : 1;
lab.fromQuery(location.search);
configToForm(form, initial.config);
go(initial.config, early);
explainer.update();
