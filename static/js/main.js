// Wires the page: URL -> form -> POST /api/run -> diagram, step-through, heatmaps, checks.
// The run's request starts first, before Plotly's bundle is parsed (it loads deferred, after
// this module); everything but the heatmaps is drawn without Plotly.
import { errorsByField, errorText, run } from "./api.js";
import { configFromForm, configFromQuery, configToForm, FIELDS, pageFromQuery, queryFromConfig, toJSON } from "./state.js";
import { ARTICLE, recipeNote, TRAINS, trainable, trainableLink } from "./recipe.js";

const initialPage = pageFromQuery(location.search);
// image data with the article's init and loss: start from settings that train (recipe.js)
const switchedConfig = trainableLink(configFromQuery(location.search), initialPage.recipe);
const initial = { config: switchedConfig || configFromQuery(location.search), page: initialPage };
let controller = new AbortController();
/** Whether a view draws autograd's maps: the run is then asked for them (api.js `run`). */
function wantsReferences(view) {
  return view === "autograd" || view === "difference";
}
/** The view a run can show: one made without autograd's maps shows the manual ones. */
const shownView = (data) => (!wantsReferences(view) || data.config?.reference_heatmaps ? view : "manual");
let mapsRefused = null; // the config (as sent) whose run with autograd's maps was refused
performance.mark("bp:run-start");
// in flight while the rest loads (a link with lab formulas waits for the lab to read them)
const early = /(^|[?&])(f\.[^=&]+\.g|hide)=/.test(location.search) ? null
  : run(initial.config, controller.signal, wantsReferences(initialPage.view));

const [{ drawChecks }, { Diagram, legend, repeatsNote, strategyNote }, { Explainer }, { bytes, h, num }, { Heatmaps, VIEWS },
  { Stepper }, { Presenter }, { ExportButtons }, { Lab }, { drawDataPanel, dropDataOwned }, { FollowPanel, cellRequest, followNote }, { blame }] =
  await Promise.all([import("./checks.js"), import("./diagram.js"), import("./explainer.js"), import("./format.js"),
    import("./heatmaps.js"), import("./stepper.js"), import("./present.js"), import("./export.js"), import("./lab.js"),
    import("./digits.js"), import("./follow.js"), import("./blame.js")]);

const $ = (id) => document.getElementById(id);
const PRESENT_SCALE = 1.8; // the diagram's 10 px labels at 18 px for a projector
const form = $("run-form");
const main = $("main");
let current = null; // the last response drawn
let currentSent = null; // the config that produced it, as sent (exact seeds)
let view = VIEWS[initial.page.view] ? initial.page.view : "manual";
let cells = initial.page.cells === "mean" ? "mean" : "extreme";
let wantedStep = initial.page.step || null; // "x:3": the step the URL asks for
let recipe = initial.page.recipe === "article" ? "article" : null; // the article's settings on real data, asked for
let switched = !!switchedConfig; // the page chose the settings that train (say so)
let stale = null; // why the page shows the last run that worked: null, "formula" or "config"

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
const heatmaps = new Heatmaps($("heatmaps"), (onScreen, all) => {
  document.body.dataset.pending = String(onScreen);
  document.body.dataset.pendingAll = String(all);
  if (!onScreen && current) performance.mark("bp:drawn");
}, (name, g, hm, row, col) => {
  // a click, or Enter on the keyboard's cursor: the panel scrolls into view once it is filled
  if (currentSent) follower.pick(cellRequest(name, g.shape, hm, row, col), currentSent);
});
const follower = new FollowPanel({
  el: $("follow-panel"),
  onChange: () => syncUrl(true),
  onMark: (follow) => {
    diagram.markFollow(follow);
    heatmaps.mark(follow ? follow.grad.replace(/\.g$/, "") : null, follow ? follow.index : null); // the followed cell, ringed
    exporter.follow = follow ? { grad: follow.grad, index: follow.index } : null;
    $("diagram-follow").hidden = !follow;
    $("diagram-follow").replaceChildren(...(follow ? followNote(follow) : []));
  },
});
follower.set(initial.page.follow);
const presenter = new Presenter({
  toggle: $("present-toggle"), drawerToggle: $("config-toggle"),
  onChange: () => {
    diagram.scale = presenter.on ? PRESENT_SCALE : 1;
    if (current) (diagram.draw(current), diagram.highlight(stepper.index), heatmaps.update(current, shownView(current), cells), drawDataPanel($("data-panel"), current));
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
    recipe,
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
  if (named.length && current) setStale("config");
  banner.hidden = !lines.length;
  banner.textContent = lines.join(" ");
  if (named.length) presenter.openDrawer();
}

// A run shorter than this shows no spinner and no faded cards: fading every card and back
// repaints the whole page twice (software compositing here), work that competed with a
// 40 ms run for the same cores, and a flash that says nothing
const BUSY_SHOWN_AFTER_MS = 150;
let busyTimer = null;

function setLoading(on) {
  clearTimeout(busyTimer);
  const show = (shown) => {
    $("loading").hidden = !shown;
    main.classList.toggle("busy", shown);
  };
  if (on) busyTimer = setTimeout(() => show(true), BUSY_SHOWN_AFTER_MS);
  else show(false);
  main.setAttribute("aria-busy", on ? "true" : "false");
  document.body.dataset.state = on ? "loading" : current ? "ready" : "empty";
}

/** "0.43 ms" below 10 ms, else whole ms: a small run is not "0 ms". */
const ms = (x) => (x < 10 ? `${x.toPrecision(2)} ms` : `${x.toFixed(0)} ms`);

/** The header's verdict: an exercise counts what is written; a failure names its cause. */
function verdict(data) {
  const hidden = [...lab.hidden];
  const written = hidden.filter((k) => data.backward.some((b) => `${b.grad}.g` === k && b.source === "user"));
  if (written.length < hidden.length) return ["todo", `Exercise: ${written.length} of ${hidden.length} written`];
  if (data.check.all_close) return ["ok", "✓ all gradients match autograd"];
  const cause = [...blame(data)].find(([, via]) => via == null)?.[0];
  return ["bad", `✗ a gradient differs from autograd${cause ? ` (the first wrong: ${cause}.g)` : ""}`];
}

const STALE = {
  formula: "Your formula was refused (see it in the code panel): showing the last run that worked.",
  config: "The server refused this config: showing the last run that worked.",
};

/** Show (why) or stop showing the last run that worked, its verdicts greyed. */
function setStale(why) {
  stale = why;
  main.classList.toggle("stale", !!why);
  for (const el of staleNotes) (el.hidden = !why), (el.textContent = why ? STALE[why] : "");
  if (current) summary(current);
}
const staleNotes = ["heatmaps", "check"].map((id) => {
  const el = h("p", { class: "notice stale-note", role: "status", hidden: true });
  $(id).before(el);
  return el;
});
const mapsNote = h("p", { class: "notice maps-note", role: "status", hidden: true });
$("heatmaps").before(mapsNote);

function summary(data) {
  const [verdictClass, verdictText] = verdict(data);
  const broadcastForm = data.config.strategy === "broadcast";
  const biggest = Math.max(0, ...data.backward.flatMap((b) => b.steps.filter((s) => s.broadcast).map((s) => s.bytes)));
  const t = data.timing;
  $("summary").replaceChildren(...[
    h("span", {}, "loss ", h("b", {}, num(data.loss, 6))),
    stale
      ? h("span", { class: "stale", id: "summary-verdict", title: STALE[stale] }, h("b", {}, "Showing the last run that worked: "), verdictText)
      : h("span", { class: verdictClass, id: "summary-verdict" }, verdictText),
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
  showMaps(data);
  drawChecks($("check"), data);
  lab.drawn();
  exporter.load(data, lab.hidden);
  drawDataPanel($("data-panel"), data);
  drawRecipe(data.config);
}

/** The heatmaps in the chosen view; a view that needs autograd's maps, on a run made
 * without them (the view changed since it was asked), shows the manual maps until the same
 * run with them is drawn (`fetchMaps`). */
function showMaps(data, fetch = true) {
  const shown = shownView(data);
  heatmaps.update(data, shown, cells);
  const sent = currentSent && toJSON(currentSent);
  mapsNote.hidden = !(shown !== view && sent && sent === mapsRefused);
  if (shown !== view && sent && fetch && sent !== mapsRefused) fetchMaps();
}

/** The view switched (a radio, or a failing card's button): with a run in flight, its
 * answer is drawn in the new view when it comes (with autograd's maps fetched then if it was
 * asked without them), so the config sent last is never replaced by the one on screen. */
function viewChanged() {
  showMaps(current, document.body.dataset.state !== "loading");
  syncUrl(true);
}

/** The run on screen again, with autograd's maps: only its heatmaps change. The form, its
 * errors and a stale state stay as they are (the learner's last input may be a refused one);
 * a refusal of the maps (a config at the work limit, which they push over) is said at the
 * heatmaps, and not asked again for that run. */
let mapsController = null;
async function fetchMaps() {
  const sent = currentSent;
  mapsController?.abort();
  const mine = (mapsController = new AbortController());
  setLoading(true);
  try {
    const data = await run(sent, mine.signal, true);
    if (mapsController !== mine || currentSent !== sent) return;
    // the same run again: only its gradients' views are taken, now with autograd's maps (the
    // rest stays as drawn: the lab's lines, an exercise's hidden code)
    current = { ...current, gradients: data.gradients, config: { ...current.config, reference_heatmaps: true } };
    showMaps(current, false);
  } catch (err) {
    if (err.name === "AbortError" || mapsController !== mine) return;
    mapsRefused = toJSON(sent);
    mapsNote.textContent = `Autograd's maps for this run were refused (${errorText(err)}): `
      + "the manual maps are shown.";
    if (current && currentSent === sent) showMaps(current, false);
  } finally {
    if (mapsController === mine) (mapsController = null), runInFlight || setLoading(false);
  }
}

function drawRecipe(config) {
  const use = (settings, choice) => () => {
    recipe = choice;
    switched = false;
    for (const [k, v] of Object.entries(settings)) form.elements[k].value = v;
    if (choice === "article") form.elements.out_features.value = "1";
    fromForm();
  };
  recipeNote($("train-recipe"), config, { switched, onArticle: use(ARTICLE, "article"), onTrains: use(TRAINS, null) }, h);
}

/** Run a config (what the form or URL says) and draw it; a newer run cancels an older one. */
let lastSent = null;
let runInFlight = false; // a run of `go` is on its way (the page shows it loading till then)
async function go(config, pending = null, withLab = true) {
  if (withLab) (config = { ...config, ...lab.request() }), lab.clearError();
  const references = wantsReferences(view);
  const key = `${toJSON(config)}${references ? " with autograd's maps" : ""}`;
  if (!pending && key === lastSent && document.body.dataset.state === "loading") return;
  const changed = currentSent ? FIELDS.map((f) => f.name).filter((n) => toJSON(config[n]) !== toJSON(currentSent[n])) : [];
  lastSent = key;
  if (!pending) {
    controller.abort();
    controller = new AbortController();
    performance.mark("bp:run-start");
  }
  mapsController?.abort(); // (the run on screen is about to be replaced)
  const mine = controller;
  showErrors({});
  runInFlight = true;
  setLoading(true);
  try {
    const data = await (pending || run(config, mine.signal, references));
    if (controller !== mine) return;
    performance.mark("bp:response");
    currentSent = config;
    // the form shows what was sent (exact, even for seeds past 2^53), the server's defaults for the rest
    configToForm(form, { ...data.config, ...config });
    setStale(null);
    draw(data);
    follower.load(config); // the followed element, in this run
    syncUrl(true);
  } catch (err) {
    if (err.name === "AbortError") return;
    // a formula's 422 is shown at the formula; with nothing drawn yet, draw the reference run
    if (withLab && lab.failed(err)) {
      if (!current) go({ ...config, formulas: undefined }, null, false);
      else setStale("formula");
      return;
    }
    showErrors(errorsByField(err), changed);
  } finally {
    if (controller === mine) {
      runInFlight = false;
      setLoading(!!mapsController);
      // refused, or stopped: the run on screen stays, in the view chosen meanwhile
      if (current && currentSent !== config && shownView(current) !== view) showMaps(current);
    }
  }
}

function fromForm(ev = null) {
  if (ev?.target?.name === "data") {
    // real data chosen: from the article's init and loss to settings that train, said so
    recipe = null;
    const next = trainable(configFromForm(form).config, recipe);
    if (next) for (const [k, v] of Object.entries(TRAINS)) form.elements[k].value = v;
    switched = !!next;
  }
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
  const page = pageFromQuery(location.search);
  recipe = page.recipe === "article" ? "article" : null;
  const asked = configFromQuery(location.search);
  const config = trainableLink(asked, recipe) || asked;
  wantedStep = page.step || null;
  view = VIEWS[page.view] ? page.view : "manual";
  follower.set(page.follow);
  lab.fromQuery(location.search);
  configToForm(form, config);
  go(config);
}

form.addEventListener("submit", (ev) => (ev.preventDefault(), fromForm()));
form.addEventListener("change", (ev) => fromForm(ev));
$("step-first").addEventListener("click", () => stepper.select(0));
$("reset-button").addEventListener("click", () => (configToForm(form, {}), fromForm()));
window.addEventListener("popstate", fromUrl);
// a failing heatmap card's "show the difference" (heatmaps.js)
$("heatmaps").addEventListener("bp:show-difference", () => {
  if (!current) return;
  setView("difference");
  viewChanged();
});
for (const input of document.querySelectorAll('input[name="grad-view"], input[name="grad-cells"]')) {
  input.addEventListener("change", () => {
    if (!current) return;
    if (input.name === "grad-view") setView(input.value);
    else cells = input.value;
    viewChanged();
  });
}
document.addEventListener("keydown", (ev) => {
  if (ev.altKey || ev.ctrlKey || ev.metaKey) return;
  if (ev.target.closest("input, select, textarea")) return;
  if (ev.key === "Home" || ev.key === "End") {
    ev.preventDefault();
    stepper.select(ev.key === "Home" ? 0 : stepper.steps.length - 1);
  } else if (ev.key === "ArrowRight" || ev.key === "ArrowLeft") {
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
  resizeTimer = setTimeout(() => current && (diagram.draw(current), diagram.highlight(stepper.index), heatmaps.update(current, shownView(current), cells)), 200);
});

presenter.set(initial.page.present === "1");
diagram.scale = presenter.on ? PRESENT_SCALE : 1;
lab.fromQuery(location.search, true);
configToForm(form, initial.config);
go(initial.config, early);
if (lab.hidden.size) {
  // an exercise: the explainer must not open on the answer's shapes
  $("bx-a").value = "4, 1, 3";
  $("bx-b").value = "5, 3";
}
explainer.update();
