// The broadcasting picture, shared by the step-through and the explainer: two operands
// right-aligned in a table, stretched dims marked, the result, and the dims a gradient sums over.
import { h, shape } from "./format.js";

/** The table for rule = {result, a: {aligned, expanded, grad_sum_dims}, b: {...}} of shapes a, b,
 * the operands labelled `names`. The last rows: with `then` ({label, dims}: the reduction the
 * formula applies next), that reduction; without, each operand's gradient sums (the adjoint). */
export function ruleTable(a, b, rule, names = ["a", "b"], then = null) {
  const n = rule.result.length;
  const head = h("tr", {}, h("th", {}, ""), ...rule.result.map((_, i) => h("th", { scope: "col" }, `dim ${i}`, h("small", {}, ` (${i - n})`))));
  const operandRow = (label, orig, side) => {
    const missing = n - orig.length;
    return h("tr", {},
      h("th", { scope: "row" }, h("code", {}, label), h("small", {}, ` ${shape(orig)}`)),
      ...rule.result.map((size, i) => {
        const stretched = side.expanded.includes(i);
        if (i < missing) return h("td", { class: "missing stretched", title: `${label} has no dim ${i}: repeated ${size} times` }, `· → ${size}`);
        const own = orig[i - missing];
        return h("td", { class: stretched ? "stretched" : "", title: stretched ? `size 1 stretched to ${size}` : "" }, stretched ? `${own} → ${size}` : String(own));
      }));
  };
  const sumRow = (label, side) =>
    h("tr", { class: "sum-row" },
      h("th", { scope: "row" }, `${label}.g sums`),
      ...rule.result.map((_, i) => h("td", { class: side.grad_sum_dims.includes(i) ? "summed" : "" }, side.grad_sum_dims.includes(i) ? "Σ" : "")));
  const table = h("table", { class: "align" },
    h("caption", {}, "Right-aligned: dims are matched from the last one; a missing or size-1 dim is stretched (orange)."),
    h("thead", {}, head),
    h("tbody", {},
      operandRow(names[0], a, rule.a),
      operandRow(names[1], b, rule.b),
      h("tr", { class: "result-row" }, h("th", { scope: "row" }, "result", h("small", {}, ` ${shape(rule.result)}`)), ...rule.result.map((s) => h("td", {}, String(s)))),
      ...(then
        ? [h("tr", { class: "sum-row then-row" }, h("th", { scope: "row" }, then.label),
            ...rule.result.map((_, i) => h("td", { class: then.dims.includes(i) ? "summed" : "" }, then.dims.includes(i) ? "Σ" : "")))]
        : [sumRow(names[0], rule.a), sumRow(names[1], rule.b)])));
  return table;
}

/** The backward half in words and code: how each operand's gradient is summed back. */
export function reductionText(a, b, rule, names = ["a", "b"]) {
  const line = (label, orig, side) => {
    const dims = side.grad_sum_dims;
    if (!dims.length) return h("li", {}, h("code", {}, `${label}.g = g`), ` — ${label} was not stretched; the gradient keeps the shape ${shape(orig)}.`);
    const keep = dims.length === 1 ? `${dims[0]}` : `(${dims.join(", ")})`;
    const code = `${label}.g = g.sum(${keep}, keepdim=True).reshape${shape(orig.length ? orig : [])}`;
    return h("li", {}, h("code", {}, code), ` — sums the result-shaped gradient ${shape(rule.result)} over dim${dims.length > 1 ? "s" : ""} ${dims.join(", ")}, back to ${shape(orig)}.`);
  };
  return h("ul", { class: "reduction" }, line(names[0], a, rule.a), line(names[1], b, rule.b));
}

/** A reduce step: its input's dims, the summed ones marked, and what is left. */
export function reduceTable(input, output, dims) {
  return h("table", { class: "align" },
    h("caption", {}, "The reduction: the marked dims are summed away."),
    h("thead", {}, h("tr", {}, h("th", {}, ""), ...input.map((_, i) => h("th", { scope: "col" }, `dim ${i}`)))),
    h("tbody", {},
      h("tr", {}, h("th", { scope: "row" }, "input", h("small", {}, ` ${shape(input)}`)), ...input.map((s, i) => h("td", { class: dims.includes(i) ? "summed" : "" }, dims.includes(i) ? `Σ ${s}` : String(s)))),
      h("tr", { class: "result-row" }, h("th", { scope: "row" }, "output", h("small", {}, ` ${shape(output)}`)), h("td", { colspan: String(input.length) }, shape(output)))));
}
