// The broadcasting explainer: two shapes in, POST /api/broadcast, the aligned table out.
import { broadcast, errorsByField } from "./api.js";
import { reductionText, ruleTable } from "./align.js";
import { bytes, h, shape } from "./format.js";

/** "(1000, 1, 50)", "1000,1,50", "1000 1 50", "()" -> [1000, 1, 50]; text it cannot read -> null. */
function parseShape(text) {
  const t = text.trim().replace(/^[([]/, "").replace(/[)\]]$/, "").trim();
  if (t === "") return [];
  const parts = t.split(/[\s,]+/).filter(Boolean);
  return parts.every((p) => /^-?\d+$/.test(p)) ? parts.map(Number) : null;
}

export class Explainer {
  constructor(form, out) {
    this.form = form;
    this.out = out;
    this.errs = { a: form.querySelector("#bx-err-a"), b: form.querySelector("#bx-err-b"), "": document.getElementById("bx-err") };
    form.addEventListener("submit", (ev) => (ev.preventDefault(), this.update()));
    let timer = null;
    form.addEventListener("input", () => (clearTimeout(timer), (timer = setTimeout(() => this.update(), 300))));
  }

  show(a, b) {
    this.form.elements.a.value = shape(a).replace(/,\)$/, ")");
    this.form.elements.b.value = shape(b).replace(/,\)$/, ")");
    this.update();
    this.form.scrollIntoView({ block: "start" });
    this.form.elements.a.focus({ preventScroll: true }); // the keyboard follows the eye
  }

  setErrors(errs) {
    for (const [key, el] of Object.entries(this.errs)) {
      el.textContent = (errs[key] || []).join("; ");
      if (key) this.form.elements[key].setAttribute("aria-invalid", errs[key] ? "true" : "false");
    }
  }

  async update() {
    const a = parseShape(this.form.elements.a.value);
    const b = parseShape(this.form.elements.b.value);
    const local = {};
    if (!a) local.a = ["write a shape as sizes separated by commas, e.g. 1000, 1, 50"];
    if (!b) local.b = ["write a shape as sizes separated by commas, e.g. 784, 50"];
    if (local.a || local.b) return this.setErrors(local);
    this.controller?.abort();
    this.controller = new AbortController();
    try {
      const rule = await broadcast(a, b, this.controller.signal);
      this.setErrors({});
      this.render(a, b, rule);
    } catch (err) {
      if (err.name === "AbortError") return;
      this.setErrors(errorsByField(err));
      this.out.replaceChildren(); // no old table under a new error
    }
  }

  render(a, b, rule) {
    this.out.classList.remove("stale");
    const cells = rule.result.reduce((x, y) => x * y, 1);
    this.out.replaceChildren(
      h("p", { class: "shapes" }, `${shape(a)} * ${shape(b)} → `, h("b", {}, shape(rule.result)),
        ` — ${cells.toLocaleString("en")} elements, ${bytes(cells * 4)} in float32 if materialized.`),
      ruleTable(a, b, rule),
      h("p", {}, "Backward: the gradient g arriving at the result has its shape; each operand's gradient sums g over the dims that operand was stretched along (and the leading dims it lacks):"),
      reductionText(a, b, rule),
    );
  }
}
