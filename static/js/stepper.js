// Step-through: walks the backward steps in execution order, shows the code with the current
// line and sub-expression marked, the step's shapes, its broadcast or reduction picture (the
// operands named as the code names them), for small runs its numbers, and for a linear
// formula its matrix form, its chain rule and (with strategy matmul or einsum) the code that ran.
import { reduceTable, ruleTable } from "./align.js";
import { actionColour, actionKey } from "./colours.js";
import { bytes, esc, h, shape } from "./format.js";
import { mathsFor } from "./maths.js";
import { operands, stepNumbers } from "./numbers.js";

export class Stepper {
  constructor({ codeEl, detailEl, posEl, prevBtn, nextBtn, mathEl, onSelect, onExplain, decorate, numbers = true }) {
    Object.assign(this, { codeEl, detailEl, posEl, prevBtn, nextBtn, mathEl, onSelect, onExplain, decorate, numbers });
    this.steps = [];
    this.index = -1;
    prevBtn.addEventListener("click", () => this.move(-1));
    nextBtn.addEventListener("click", () => this.move(1));
  }

  /** A step's name in the URL: "x:3" (third step of x.g's formula), "out~2:1" for a second
   * formula of the same gradient. */
  id(i) {
    const p = this.steps[i];
    if (!p) return null;
    const same = this.data.backward.slice(0, p.e + 1).filter((b) => b.grad === p.entry.grad).length;
    return `${p.entry.grad}${same > 1 ? `~${same}` : ""}:${p.s + 1}`;
  }

  /** New run: list the code; select the step `wanted` names (a re-run keeps the step), else
   * the biggest broadcast step (the article's picture). */
  load(data, steps, wanted = null) {
    this.data = data;
    this.steps = steps;
    this.codeEl.replaceChildren(
      // forward code may hold several statements, one per line (white-space: pre-wrap)
      ...data.forward.map((f) => h("li", { class: "fwd" }, h("code", {}, f.code))),
      ...data.backward.map((b, e) => {
        const li = h("li", { class: "bwd", "data-entry": String(e) },
          h("button", { type: "button", class: "code-line", onclick: () => this.select(steps.findIndex((p) => p.e === e)) },
            h("code", {}, b.code)));
        this.decorate?.(li, b, e); // the formula lab's tools (lab.js)
        return li;
      }),
    );
    let pick = wanted ? steps.findIndex((_, i) => this.id(i) === wanted) : -1;
    if (pick < 0) {
      steps.forEach((p, i) => {
        if (p.step.broadcast && (pick < 0 || p.step.bytes > steps[pick].step.bytes)) pick = i;
      });
    }
    this.select(pick >= 0 ? pick : 0, true);
  }

  move(delta) {
    if (!this.steps.length) return;
    this.select(Math.min(this.steps.length - 1, Math.max(0, this.index + delta)));
  }

  /** Select step i (`auto`: the page chose it, not the user). */
  select(i, auto = false) {
    if (i < 0 || i >= this.steps.length) return;
    this.index = i;
    const p = this.steps[i];
    const st = p.step;
    this.posEl.textContent = `step ${i + 1} of ${this.steps.length}`;
    this.prevBtn.disabled = i === 0;
    this.nextBtn.disabled = i === this.steps.length - 1;
    for (const li of this.codeEl.querySelectorAll("li.bwd")) {
      const on = Number(li.dataset.entry) === p.e;
      li.classList.toggle("current", on);
      const code = li.querySelector(".code-line code");
      const text = this.data.backward[Number(li.dataset.entry)].code;
      const at = on ? text.lastIndexOf(st.expr) : -1;
      code.innerHTML = at < 0 ? esc(text) : `${esc(text.slice(0, at))}<mark>${esc(st.expr)}</mark>${esc(text.slice(at + st.expr.length))}`;
      if (on) li.querySelector("button").setAttribute("aria-current", "step");
      else li.querySelector("button").removeAttribute("aria-current");
    }
    this.detailEl.replaceChildren(...this.detail(p));
    if (this.mathEl) this.mathEl.replaceChildren(...this.maths(p));
    this.onSelect(i, auto);
  }

  /** The formula's maths: matrix form, chain rule, and the code that ran (strategy). */
  maths(p) {
    const m = mathsFor(p.entry.code);
    if (!m) return [];
    const strategy = this.data.config.strategy;
    const lead = Array.isArray(this.data.config.batch) && this.data.config.batch.length > 1;
    const out = [
      h("h3", {}, "The maths"),
      h("p", { class: "math-line" }, h("span", { class: "math-label" }, "matrix form "), h("code", {}, m.matrix)),
      h("p", { class: "math-line" }, h("span", { class: "math-label" }, "chain rule "), h("code", {}, m.chain)),
    ];
    if (m.ran && strategy !== "broadcast") {
      out.push(h("p", { class: "math-line ran", id: "code-ran" },
        h("span", { class: "math-label" }, `ran (strategy ${strategy}) `), h("code", {}, m.ran[strategy]),
        h("span", { class: "muted" }, ` instead of the broadcast formula above: same gradient, no ${lead ? "broadcast intermediate (leading dims flattened to N rows)" : "broadcast intermediate"}.`)));
    }
    return out;
  }

  detail(p) {
    const st = p.step;
    const key = actionKey(st);
    const badge = h("span", { class: "badge" }, st.action);
    badge.style.background = actionColour(key);
    badge.style.color = "#fff";
    const strategy = this.data.config.strategy;
    const out = [
      h("p", { class: "step-head" }, badge,
        ` ${st.op} · step ${p.s + 1} of ${p.entry.steps.length} of `, h("code", {}, `${p.entry.grad}.g`)),
      h("pre", { class: "expr" }, st.expr),
      h("p", { class: "shapes" }, st.inputs.map(shape).join("  ·  "), "  →  ", h("b", {}, shape(st.output)),
        h("span", { class: st.broadcast && strategy === "broadcast" ? "mem big" : "mem" },
          strategy === "broadcast" || !st.broadcast ? ` ${bytes(st.bytes)} if materialized` : ` ${bytes(st.bytes)} if materialized (strategy ${strategy} never does)`)),
    ];
    const next = p.entry.steps[p.s + 1];
    if (st.broadcast && st.inputs.length === 2) {
      const [a, b] = st.inputs;
      const names = operands(st.expr) || ["a", "b"];
      // what this formula does next: its reduction sums the stretched product back down
      const call = next && next.reduced_dims ? /\.(sum|mean)\([^()]*\)$/.exec(next.expr) : null;
      const then = next && next.reduced_dims ? { label: `then ${call ? call[0] : "the sum"}`, dims: next.reduced_dims } : null;
      out.push(ruleTable(a, b, st.broadcast, names, then));
      out.push(h("button", { type: "button", class: "secondary small", onclick: () => this.onExplain(a, b) }, "Try these shapes in the explainer ↓"));
    } else if (st.reduced_dims && st.inputs.length === 1) {
      out.push(reduceTable(st.inputs[0], st.output, st.reduced_dims));
    }
    if (this.data.values) {
      const toggle = h("label", { class: "numbers-toggle" },
        h("input", { type: "checkbox", id: "numbers-toggle", checked: this.numbers ? true : null, onchange: (ev) => { this.numbers = ev.target.checked; this.select(this.index); } }),
        " show the numbers");
      out.push(toggle);
      if (this.numbers) out.push(...stepNumbers(this.data, p));
    }
    if (p.last) out.push(h("p", { class: "grad-done" }, `This step's result is the gradient `, h("code", {}, `${p.entry.grad}.g`), ` ${shape(p.entry.shape)}.`));
    return out;
  }
}
