// Follow one element of a written gradient on the program page: a click on the manual
// heatmap asks POST /api/program for `follow` (app/programs/follow.py) and lists the line
// that last wrote the element and the terms its last reduction adds up (a matmul's
// products, a sum's entries, an index_add's repeats, a fold's windows; an entrywise line's
// one term with its factors). The terms' sum is shown beside the element's value.
import * as api from "./api.js";
import { h, num } from "./format.js";

const SHOWN = 12; // terms listed on the page (the answer holds up to 4096)

/** The element of a tensor of `shape` that heatmap cell (row, col) starts: the heatmap is the
 * tensor as (-1, last dim), block-averaged (row_block x col_block). */
function cellIndex(shape, hm, row, col) {
  const cols = shape.length ? shape[shape.length - 1] : 1;
  let flat = row * (hm.row_block || 1) * cols + col * (hm.col_block || 1);
  const index = [];
  for (let d = shape.length - 1; d >= 0; d--) {
    index.unshift(flat % shape[d]);
    flat = Math.floor(flat / shape[d]);
  }
  return index;
}

function termRow(term) {
  const factors = Object.entries(term.factors).map(([name, v]) =>
    h("span", { class: "factor" }, h("code", {}, `${name}${term.index[name] ? `[${term.index[name].join(", ")}]` : ""}`), ` ${num(v, 4)}`));
  return h("tr", {}, h("td", {}, ...factors.flatMap((f, i) => (i ? [" × ", f] : [f]))), h("td", { class: "num" }, num(term.value, 5)));
}

/** The answer's `follow`, drawn into `box`. */
function showFollow(box, f) {
  box.hidden = false;
  if (!f || f.line == null) {
    box.replaceChildren(h("p", { class: "muted" }, f ? `${f.grad}[${f.index.join(", ")}] = ${num(f.value, 5)}: no line of the backward writes it` : "That gradient is not written."));
    return;
  }
  const more = f.terms_total > SHOWN ? ` (the first ${SHOWN} of ${f.terms_total} shown)` : "";
  box.replaceChildren(
    h("p", {}, h("b", {}, `${f.grad}[${f.index.join(", ")}] = ${num(f.value, 6)}`), " · last written at line ", h("b", {}, String(f.line)), ": ", h("code", {}, f.code)),
    h("p", { class: "muted" }, `${f.terms_total} term${f.terms_total === 1 ? "" : "s"} add up to ${num(f.sum, 6)}${more}`),
    h("table", { class: "follow-terms" }, h("thead", {}, h("tr", {}, h("th", {}, "factors"), h("th", {}, "term"))), h("tbody", {}, ...f.terms.slice(0, SHOWN).map(termRow))),
  );
  box.dataset.terms = String(f.terms_total);
  box.dataset.line = String(f.line);
}

/** Clicking the manual map of `name` follows that cell's first element. */
export function attachFollow(el, { program, name, shape, heatmap, box, onLine }) {
  if (!el.on) return;
  el.removeAllListeners?.("plotly_click");
  el.on("plotly_click", async (ev) => {
    const p = ev.points?.[0];
    if (!p) return;
    const index = cellIndex(shape, heatmap, p.y, p.x);
    box.hidden = false;
    box.replaceChildren(h("p", { class: "muted" }, `Following ${name}[${index.join(", ")}]…`));
    try {
      const answer = await api.followProgram(program(), { grad: name, index });
      showFollow(box, answer.follow);
      if (answer.follow?.line) onLine(answer.follow.line);
    } catch (err) {
      box.replaceChildren(h("p", { class: "bad" }, api.errorText(err)));
    }
  });
}
