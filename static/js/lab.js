// The formula lab: every backward formula in the code panel can be rewritten in place and
// checked against autograd; a gallery bug can be applied ("Break it"); chosen reference
// formulas can be hidden so that a learner must write them (an exercise, handed out as a link).
// URL: one `f.<name>.g=<source>` per learner formula, `hide=x.g,w1.g` for the hidden ones.
import { ApiError, bugs as fetchBugs } from "./api.js";
import { blame, blameText } from "./blame.js";
import { h, num, shape } from "./format.js";

const PREFIX = "f."; // f.x.g=<source>

/** The lab's state in a query string: {formulas: {"x.g": source}, hidden: ["x.g", ...]}. */
export function labFromQuery(search) {
  const params = new URLSearchParams(search);
  const formulas = {};
  for (const [k, v] of params) if (k.startsWith(PREFIX) && k.endsWith(".g")) formulas[k.slice(PREFIX.length)] = v;
  const hidden = (params.get("hide") || "").split(",").map((s) => s.trim()).filter(Boolean);
  return { formulas, hidden: hidden.map((k) => (k.endsWith(".g") ? k : `${k}.g`)) };
}

/** The config's query string with the lab's state appended (sorted: one URL per state). */
function labQuery(base, formulas, hidden) {
  const parts = Object.keys(formulas).sort().map((k) => `${PREFIX}${k}=${encodeURIComponent(formulas[k])}`);
  if (hidden.length) parts.push(`hide=${[...hidden].sort().join(",")}`);
  if (!parts.length) return base;
  return `${base || "?"}${base ? "&" : ""}${parts.join("&")}`;
}

const KIND_LABEL = { shape: "shape error", value: "wrong values", silent: "silent: passes the article's is_same" };

/** "text `code` text" -> text and <code> nodes. */
function ticks(text) {
  return String(text).split("`").map((part, i) => (i % 2 ? h("code", {}, part) : part));
}

/** A formula's 422 drawn at the formula: the sentence, the hint, and the shapes right-aligned
 * with the clashing dim marked (or the shape wanted against the shape made). */
function formulaError(d, hideHint = false) {
  const ctx = d.ctx || {};
  const first = String(d.msg || "invalid").split("\n")[0];
  const cut = first.indexOf("; ");
  const [head, hint] = cut > 0 && (ctx.kind === "shape" || ctx.kind === "result_shape") ? [first.slice(0, cut), first.slice(cut + 2)] : [first, ""];
  const out = [h("p", { class: "lab-msg" }, h("b", {}, "✗ "), ...ticks(head))];
  if (Array.isArray(ctx.operands) && ctx.operands.length) out.push(operandTable(ctx));
  else if (ctx.made && ctx.wanted) out.push(resultTable(ctx.made, ctx.wanted));
  // in an exercise a hint can print the answer: it waits until the learner asks for it
  const hintEl = hint ? h("p", { class: "lab-hint", hidden: hideHint || null }, h("b", {}, "Hint: "), ...ticks(hint)) : null;
  if (hintEl && hideHint) {
    out.push(h("button", { type: "button", class: "secondary small lab-show-hint", onclick: (ev) => ((hintEl.hidden = false), ev.target.remove()) }, "Show the hint (it may give the answer)"));
  }
  if (hintEl) out.push(hintEl);
  return h("div", { class: "lab-error", role: "alert", "data-kind": ctx.kind || d.type || "" }, ...out);
}

function alignedTable(caption, rows, n, mark) {
  return h("table", { class: "align lab-align" },
    h("caption", {}, caption),
    h("thead", {}, h("tr", {}, h("th", {}, ""), ...[...Array(n).keys()].map((j) => h("th", { scope: "col" }, `dim ${j - n}`)))),
    h("tbody", {}, ...rows.map(([label, dims], r) => {
      const pad = n - dims.length;
      return h("tr", {},
        h("th", { scope: "row" }, h("code", {}, label), h("small", {}, ` ${shape(dims)}`)),
        ...[...Array(n).keys()].map((j) => (j < pad
          ? h("td", { class: "missing" }, "·")
          : h("td", { class: mark(r, j) ? "clash" : "" }, String(dims[j - pad])))));
    })));
}

function operandTable(ctx) {
  const ops = ctx.operands;
  const n = Math.max(...ops.map((o) => o.shape.length), 1);
  const matmul = ctx.dim == null && ops.length === 2 && String(ctx.expr || "").includes("@");
  const mark = (r, j) => (ctx.dim != null ? j === n + ctx.dim
    : matmul ? (r === 0 && j === n - 1) || (r === 1 && j === n - 2) : false);
  const caption = ctx.dim != null
    ? `Right-aligned: dim ${ctx.dim} clashes (${(ctx.sizes || []).join(" vs ")}); sizes must be equal or one of them 1.`
    : matmul ? "For @, the left's last dim must equal the right's second-to-last." : "The operands, right-aligned.";
  return alignedTable(caption, ops.map((o) => [o.expr, o.shape]), n, mark);
}

function resultTable(made, wanted) {
  const n = Math.max(made.length, wanted.length, 1);
  const at = (dims, j) => dims[j - (n - dims.length)];
  const mark = (r, j) => at(made, j) !== at(wanted, j);
  return alignedTable("The result's shape against the gradient's shape (it must be the tensor's own).", [["made", made], ["wanted", wanted]], n, mark);
}

export class Lab {
  /** onCheck(): run the current config again with this.formulas (main.js owns the run). */
  constructor({ barEl, onCheck }) {
    Object.assign(this, { barEl, onCheck });
    this.formulas = {}; // key -> the learner's source, sent with every run
    this.hidden = new Set(); // keys whose reference formula the page must not show
    this.open = new Set(); // keys whose editor is open
    this.drafts = {}; // key -> text in an open editor
    this.refs = {}; // key -> the reference formula, from the last run (never for hidden keys)
    this.error = null; // the last formula 422: {key, detail}
    this.lesson = null; // the gallery bug applied last
    this.combine = false; // a gallery bug joins the ones applied (else it replaces them)
    this.sent = {}; // the formulas of the last run asked for (a refused run's are the error's)
    this.fromLink = false; // opened as an exercise: the learner's page, not the teacher's
    this.lines = new Map(); // key -> its <li> in the code panel
    this.bugs = [];
    this.data = null;
    fetchBugs().then((list) => ((this.bugs = Array.isArray(list) ? list : []), this.matchLesson(), this.drawBar()))
      .catch(() => this.drawBar());
  }

  // ---- state <-> URL ----------------------------------------------------------------------
  /** `opened`: the page's own URL at load (a learner's exercise link, not the teacher's page). */
  fromQuery(search, opened = false) {
    const { formulas, hidden } = labFromQuery(search);
    this.formulas = formulas;
    this.hidden = new Set(hidden);
    this.open = new Set([...Object.keys(formulas), ...hidden]);
    this.drafts = { ...formulas };
    this.error = null;
    if (opened) this.fromLink = this.hidden.size > 0;
    this.matchLesson();
  }

  query(base) {
    return labQuery(base, this.formulas, [...this.hidden]);
  }

  /** What a run sends besides the config. */
  request() {
    this.sent = { ...this.formulas };
    return Object.keys(this.formulas).length ? { formulas: { ...this.formulas } } : {};
  }

  matchLesson() {
    this.lesson = this.lessons().at(-1) || null;
  }

  /** The gallery bugs the formulas hold now (never a hidden gradient's: that is the answer). */
  lessons() {
    return this.bugs.filter((b) => this.formulas[b.grad] === b.formula && !this.hidden.has(b.grad));
  }

  /** Whether the run on screen shows what a bug's lesson says: a shape bug refused at its
   * formula; a value or silent bug run and failing the check at its gradient. Else why not. */
  shows(bug) {
    const err = this.error;
    if (bug.kind === "shape") {
      if (err?.key === bug.grad && err.formulas?.[bug.grad] === bug.formula) return { ok: true };
      return { ok: false, why: err ? `the run was refused at ${err.key}` : "waiting for the run" };
    }
    if (err) return { ok: false, why: `the run was refused at ${err.key ?? "a formula"}, so nothing with this bug has run` };
    const ran = this.data?.config?.formulas?.[bug.grad] === bug.formula;
    if (!ran) return { ok: false, why: "waiting for the run" };
    const c = this.check(bug.grad);
    if (c && !c.allclose) return { ok: true };
    return { ok: false, why: `on this run ${bug.grad} matches autograd, so the lesson does not apply here` };
  }

  // ---- a run drawn or refused -------------------------------------------------------------
  /** The response as the page may show it: a hidden gradient's reference code and steps
   * (their expressions are the answer) are left out; the learner's own stay. */
  redact(data) {
    this.data = data;
    this.lines = new Map(); // the stepper lists the lines again (decorate)
    for (const b of data.backward) {
      const key = `${b.grad}.g`;
      if (!this.hidden.has(key)) this.refs[key] = b.source === "user" ? b.reference_code : b.code;
    }
    if (!this.hidden.size) return data;
    const backward = data.backward.map((b) => (this.hidden.has(`${b.grad}.g`) && b.source !== "user"
      ? { ...b, code: `${b.grad}.g = …   # ${shape(b.shape)}`, steps: [], reference_code: undefined, hidden: true }
      : b));
    // an exercise's gradients the learner has not written yet run on the reference formula:
    // the check table says "to write", not "pass"
    const todo = backward.filter((b) => b.hidden).map((b) => b.grad);
    return { ...data, backward, todo };
  }

  /** After a run drawn: the bar (marks and lines are drawn by decorate()). */
  drawn() {
    this.drawBar();
  }

  /** A refused run: true when the lab shows it (a formula's 422), at its formula. */
  failed(err) {
    if (!(err instanceof ApiError) || err.status !== 422 || !Array.isArray(err.body?.detail)) return false;
    const d = err.body.detail.find((x) => Array.isArray(x.loc) && x.loc[0] === "body" && x.loc[1] === "formulas");
    if (!d) return false;
    this.error = { key: d.loc[2] == null ? null : String(d.loc[2]), detail: d, formulas: this.sent };
    if (this.error.key) this.open.add(this.error.key);
    for (const key of this.lines.keys()) this.drawLine(key);
    this.drawBar();
    return true;
  }

  clearError() {
    this.error = null;
  }

  // ---- the code panel ---------------------------------------------------------------------
  /** Called by the stepper for every backward line it lists. */
  decorate(li, entry) {
    const key = `${entry.grad}.g`;
    li.dataset.key = key;
    this.lines.set(key, li);
    this.drawLine(key);
  }

  check(key) {
    const c = this.data?.check;
    return c ? c.tensors?.[key.slice(0, -2)] || c.intermediates?.[key.slice(0, -2)] : null;
  }

  drawLine(key) {
    const li = this.lines.get(key);
    if (!li) return;
    const entry = this.data.backward.find((b) => `${b.grad}.g` === key);
    const user = entry?.source === "user";
    const blank = this.hidden.has(key) && !user;
    // a refused formula has no verdict: the marks below are the last run that worked
    const c = blank || this.error?.key === key ? null : this.check(key);
    const why = c && !c.allclose && this.data ? blameText(blame(this.data), key.slice(0, -2)) : "";
    li.classList.toggle("lab-user", user);
    li.classList.toggle("lab-blank", blank);
    li.classList.toggle("lab-pass", user && !!c?.allclose);
    li.classList.toggle("lab-fail", user && !!c && !c.allclose);
    li.classList.toggle("lab-refused", this.error?.key === key);
    for (const el of li.querySelectorAll(":scope > .lab-tools, :scope > .lab-panel")) el.remove();
    const tools = h("span", { class: "lab-tools" },
      user ? h("span", { class: "lab-badge", title: "computed by your formula" }, "yours") : null,
      blank ? h("span", { class: "lab-badge todo" }, "write it") : null,
      c ? h("span", { class: `lab-mark ${c.allclose ? "pass" : "fail"}`, title: `against autograd: max rel err ${num(c.max_rel_err)}, max abs err ${num(c.max_abs_err)}; allclose with rtol ${num(c.rtol)}, atol ${num(c.atol)}` },
        c.allclose ? "✓" : "✗", h("small", {}, c.exact ? " exact" : ` ${num(c.max_rel_err, 2)}`)) : null,
      why ? h("small", { class: `lab-blame${why.startsWith("wrong because") ? " downstream" : " cause"}`, title: why }, why.startsWith("wrong because") ? why.replace(/^wrong because it /, "").replace(/ \(.*$/, "") : why.startsWith("the first") ? "fix this first" : "wrong here") : null,
      this.open.has(key) ? null : h("button", { type: "button", class: "secondary small lab-edit", "aria-label": `Edit ${key}`, onclick: () => this.edit(key) }, "Edit"));
    li.append(tools);
    if (this.open.has(key)) li.append(this.panel(key, entry, blank));
  }

  panel(key, entry, blank) {
    const text = this.drafts[key] ?? this.formulas[key] ?? (this.hidden.has(key) ? "" : this.refs[key] || "");
    const lines = Math.max(2, text.split("\n").length + 1);
    const area = h("textarea", {
      class: "lab-source", rows: String(Math.min(10, lines)), spellcheck: "false", autocomplete: "off",
      "aria-label": `Your formula for ${key}`, placeholder: `${key} = …   (shape ${shape(entry?.shape || [])})`,
      "data-key": key,
      // what the last Check sent for this key: the Train panel warns when the text differs
      "data-sent": this.formulas[key] ?? (this.hidden.has(key) ? "" : this.refs[key] || ""),
    });
    area.value = text;
    area.addEventListener("input", () => (this.drafts[key] = area.value));
    area.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) (ev.preventDefault(), this.submit());
      else if (ev.key === "Escape" && !this.hidden.has(key)) (ev.preventDefault(), this.close(key));
    });
    const err = this.error?.key === key ? formulaError(this.error.detail, this.hidden.has(key)) : null;
    return h("div", { class: "lab-panel" },
      blank ? h("p", { class: "lab-task" }, "Your formula for ", h("code", {}, key), ` ${shape(entry?.shape || [])}: any tensor of the run, and the gradients above this line.`) : null,
      area,
      h("div", { class: "lab-actions" },
        h("button", { type: "button", class: "small lab-check", onclick: () => this.submit() }, "Check"),
        h("button", { type: "button", class: "secondary small lab-reset", onclick: () => this.reset(key), title: this.hidden.has(key) ? "Clear your formula" : "Back to the reference formula" }, this.hidden.has(key) ? "Clear" : "Reset"),
        this.hidden.has(key) ? null : h("button", { type: "button", class: "secondary small lab-cancel", onclick: () => this.close(key) }, "Close"),
        h("span", { class: "muted lab-keys" }, "Ctrl+Enter checks")),
      err);
  }

  edit(key) {
    this.open.add(key);
    this.drawLine(key);
    this.lines.get(key)?.querySelector("textarea")?.focus();
  }

  close(key) {
    this.open.delete(key);
    delete this.drafts[key];
    if (this.error?.key === key) this.error = null;
    this.drawLine(key);
  }

  /** Check: every open editor's text becomes a formula (empty: none), then one run. */
  submit() {
    for (const key of this.open) {
      const text = (this.drafts[key] ?? this.formulas[key] ?? "").trim();
      if (!text || (text === this.refs[key] && !this.hidden.has(key))) delete this.formulas[key];
      else this.formulas[key] = text;
    }
    this.matchLesson();
    this.onCheck();
  }

  reset(key) {
    delete this.formulas[key];
    delete this.drafts[key];
    if (!this.hidden.has(key)) this.open.delete(key);
    if (this.error?.key === key) this.error = null;
    this.matchLesson();
    this.onCheck();
  }

  resetAll() {
    this.formulas = {};
    this.drafts = {};
    this.open = new Set(this.hidden);
    this.error = null;
    this.lesson = null;
    this.onCheck();
  }

  /** A gallery bug, alone: the bugs applied before (and a refused formula, which would stop
   * any run) are reset, unless the learner asked to combine them. */
  applyBug(id) {
    const bug = this.bugs.find((b) => b.id === id);
    if (!bug) return;
    if (!this.combine) {
      for (const key of Object.keys(this.formulas)) {
        if (key === bug.grad || this.hidden.has(key)) continue;
        const gallery = this.bugs.some((b) => b.grad === key && b.formula === this.formulas[key]);
        if (gallery || this.error?.key === key) (delete this.formulas[key], delete this.drafts[key], this.open.delete(key));
      }
    }
    this.error = null;
    this.formulas[bug.grad] = bug.formula;
    this.drafts[bug.grad] = bug.formula;
    this.open.add(bug.grad);
    this.lesson = bug;
    this.onCheck();
    for (const key of this.lines.keys()) this.drawLine(key);
    this.drawBar();
  }

  // ---- the bar above the code -------------------------------------------------------------
  drawBar() {
    const bar = this.barEl;
    const select = h("select", { id: "lab-bugs", "aria-label": "Break it: apply a classic mistake", disabled: this.bugs.length ? null : true },
      h("option", { value: "" }, this.bugs.length ? "Break it: a classic mistake…" : "Break it (no gallery)"),
      ...["shape", "value", "silent"].map((kind) => h("optgroup", { label: KIND_LABEL[kind] },
        ...this.bugs.filter((b) => b.kind === kind && !this.hidden.has(b.grad)).map((b) => h("option", { value: b.id }, `${b.grad}: ${b.title}`)))));
    select.value = this.lesson?.id || "";
    select.addEventListener("change", () => this.applyBug(select.value));
    const mine = Object.keys(this.formulas);
    const combine = h("input", { type: "checkbox", id: "lab-combine", checked: this.combine || null });
    combine.addEventListener("change", () => (this.combine = combine.checked));
    const items = [
      h("div", { class: "lab-row" },
        select,
        h("label", { class: "lab-combine", title: "Off: a bug from the menu replaces the one applied before" }, combine, " combine bugs"),
        mine.length ? h("button", { type: "button", class: "secondary small", id: "lab-reset-all", onclick: () => this.resetAll() }, `Reset ${mine.length === 1 ? "the formula" : `all ${mine.length} formulas`}`) : null,
        h("span", { class: "muted lab-tip" }, "Edit any backward line to write your own formula; Check runs it against autograd.")),
    ];
    // a lesson is shown only beside a run that shows it; otherwise, why not
    const lessons = this.lessons();
    for (const b of lessons) {
      const shown = this.shows(b);
      const head = h("p", {}, h("span", { class: "lab-kind" }, KIND_LABEL[b.kind] || b.kind), " ", h("b", {}, b.title), " — ", h("code", {}, b.grad));
      items.push(shown.ok
        ? h("div", { class: `lab-lesson kind-${b.kind}`, id: lessons.length === 1 ? "lab-lesson" : null, "data-bug": b.id }, head, h("p", {}, ...ticks(b.lesson)))
        : h("div", { class: "lab-lesson waiting", id: lessons.length === 1 ? "lab-lesson" : null, "data-bug": b.id }, head, h("p", { class: "muted" }, `Its lesson is not shown: ${shown.why}.`)));
    }
    if (this.hidden.size) items.push(this.exercise());
    if (this.data && !this.fromLink) items.push(this.maker()); // a learner's link cannot untick it
    if (this.error && !this.lines.has(this.error.key)) {
      items.push(h("div", { class: "lab-error", role: "alert" }, h("p", { class: "lab-msg" }, h("b", {}, `✗ formulas.${this.error.key ?? ""}: `), ...ticks(this.error.detail.msg))));
    }
    bar.replaceChildren(...items);
  }

  /** For a teacher: tick the formulas to hide; the URL (shown to copy) is the exercise. */
  maker() {
    const keys = this.data.backward.map((b) => `${b.grad}.g`);
    const box = h("details", { class: "lab-make", id: "lab-make", open: this.makerOpen || null },
      h("summary", {}, "Make an exercise: hide formulas"),
      h("div", { class: "lab-row" }, ...keys.map((k) => {
        const input = h("input", { type: "checkbox", value: k, checked: this.hidden.has(k) || null });
        input.addEventListener("change", () => this.toggleHidden(k, input.checked));
        return h("label", {}, input, " ", h("code", {}, k));
      })),
      h("label", { class: "lab-link" }, "Link: ", h("input", { type: "text", readonly: true, value: location.href, "aria-label": "Link to this exercise", onfocus: (ev) => ev.target.select() })));
    box.addEventListener("toggle", () => (this.makerOpen = box.open));
    return box;
  }

  toggleHidden(key, on) {
    if (on) (this.hidden.add(key), this.open.add(key));
    else (this.hidden.delete(key), this.formulas[key] || this.open.delete(key));
    delete this.drafts[key];
    this.onCheck();
  }

  exercise() {
    const keys = [...this.hidden];
    const done = keys.filter((k) => {
      const e = this.data?.backward.find((b) => `${b.grad}.g` === k);
      return e?.source === "user" && this.check(k)?.allclose;
    });
    const all = done.length === keys.length;
    return h("div", { class: `lab-exercise${all ? " done" : ""}`, id: "lab-exercise" },
      h("b", {}, "Exercise: "), "write ", ...keys.flatMap((k, i) => [i ? ", " : "", h("code", {}, k)]), ". ",
      all ? h("span", { class: "lab-mark pass" }, `✓ all ${keys.length} match autograd`)
        : `${done.length} of ${keys.length} written and matching autograd. Until you write one, the reference computes it (unseen), so the rest of the run still works.`);
  }
}
