// Step-through: walks the backward steps in execution order, shows the code with the current
// line and sub-expression marked, the step's shapes, and its broadcast or reduction picture.
import { reduceTable, reductionText, ruleTable } from "./align.js";
import { bytes, esc, h, shape } from "./format.js";

export class Stepper {
  constructor({ codeEl, detailEl, posEl, prevBtn, nextBtn, onSelect, onExplain, decorate }) {
    Object.assign(this, { codeEl, detailEl, posEl, prevBtn, nextBtn, onSelect, onExplain, decorate });
    this.steps = [];
    this.index = -1;
    prevBtn.addEventListener("click", () => this.move(-1));
    nextBtn.addEventListener("click", () => this.move(1));
  }

  /** New run: list the code, select the biggest broadcast step (the article's picture). */
  load(data, steps) {
    this.data = data;
    this.steps = steps;
    this.codeEl.replaceChildren(
      ...data.forward.map((f) => h("li", { class: "fwd" }, h("code", {}, f.code))),
      ...data.backward.map((b, e) => {
        const li = h("li", { class: "bwd", "data-entry": String(e) },
          h("button", { type: "button", class: "code-line", onclick: () => this.select(steps.findIndex((p) => p.e === e)) },
            h("code", {}, b.code)));
        this.decorate?.(li, b, e); // the formula lab's tools (lab.js)
        return li;
      }),
    );
    let best = -1;
    steps.forEach((p, i) => {
      if (p.step.broadcast && (best < 0 || p.step.bytes > steps[best].step.bytes)) best = i;
    });
    this.select(best >= 0 ? best : 0);
  }

  move(delta) {
    if (!this.steps.length) return;
    this.select(Math.min(this.steps.length - 1, Math.max(0, this.index + delta)));
  }

  select(i) {
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
    this.onSelect(i);
  }

  detail(p) {
    const st = p.step;
    const out = [
      h("p", { class: "step-head" },
        h("span", { class: `badge action-${st.broadcast ? "broadcast" : st.action}` }, st.action),
        ` ${st.op} · step ${p.s + 1} of ${p.entry.steps.length} of `, h("code", {}, `${p.entry.grad}.g`)),
      h("pre", { class: "expr" }, st.expr),
      h("p", { class: "shapes" }, st.inputs.map(shape).join("  ·  "), "  →  ", h("b", {}, shape(st.output)),
        h("span", { class: st.broadcast ? "mem big" : "mem" }, ` ${bytes(st.bytes)} if materialized`)),
    ];
    if (st.broadcast && st.inputs.length === 2) {
      const [a, b] = st.inputs;
      out.push(ruleTable(a, b, st.broadcast), reductionText(a, b, st.broadcast));
      out.push(h("button", { type: "button", class: "secondary small", onclick: () => this.onExplain(a, b) }, "Try these shapes in the explainer ↓"));
    } else if (st.reduced_dims && st.inputs.length === 1) {
      out.push(reduceTable(st.inputs[0], st.output, st.reduced_dims));
    }
    if (p.last) out.push(h("p", { class: "grad-done" }, `This step's result is the gradient `, h("code", {}, `${p.entry.grad}.g`), ` ${shape(p.entry.shape)}.`));
    return out;
  }
}
