// The check table: every gradient against torch.autograd, with the tolerances used.
import { blame, blameText } from "./blame.js";
import { bytes, h, num, shape } from "./format.js";

export function drawChecks(el, data) {
  const check = data.check;
  const fd = check.finite_difference || null;
  const mark = (ok) => h("span", { class: ok ? "yes" : "no" }, ok ? "✓ yes" : "✗ no");
  const head = ["tensor", "shape", "max abs err", "max rel err", "rtol", "atol", "allclose", "exact", "result"];
  if (fd) head.push("fd samples", "fd max abs err", "fd max rel err", "fd result");
  // leaves first, then the intermediates the check also covers (out, l{k}, a{k}, n{k}, and a
  // second formula of one gradient, e.g. cross-entropy's fused out.g)
  const entries = [
    ...Object.entries(check.tensors).map(([name, c]) => [name, c, false]),
    ...Object.entries(check.intermediates || {}).map(([name, c]) => [name, c, true]),
  ];
  const todo = new Set(data.todo || []); // an exercise's gradients not written yet
  const wrong = blame(data); // which failing gradient is the cause, which only use it
  const rows = entries.map(([key, c, inter]) => {
    const [name, variant] = key.split(":");
    const unwritten = todo.has(name);
    const shp = (data.gradients[name] || data.tensors[name] || {}).shape;
    const cells = [
      h("th", { scope: "row" }, h("code", {}, `${name}.g`), variant ? ` (${variant})` : "", inter ? h("small", { class: "muted" }, " intermediate") : ""),
      h("td", {}, shp ? shape(shp) : "–"),
      h("td", { class: "n" }, num(c.max_abs_err)),
      h("td", { class: "n" }, num(c.max_rel_err)),
      h("td", { class: "n" }, num(c.rtol)),
      h("td", { class: "n" }, num(c.atol)),
      h("td", {}, mark(c.allclose)),
      h("td", {}, mark(c.exact)),
      unwritten
        ? h("td", { title: "An exercise: this gradient runs on the reference formula until you write yours" }, h("span", { class: "verdict todo" }, "to write"))
        : c.suspect
          ? h("td", {}, h("span", { class: "verdict suspect" }, "suspect"), h("small", { class: "why" }, suspectWhy(c)))
          : h("td", {}, h("span", { class: `verdict ${c.allclose ? "pass" : "fail"}` }, c.allclose ? "pass" : "FAIL"),
          wrong.has(name) && !variant ? h("small", { class: `blame ${wrong.get(name) ? "downstream" : "cause"}` }, blameText(wrong, name)) : null,
          diagnosisText(c)),
    ];
    if (fd) {
      const f = (inter ? {} : fd[name]) || {};
      cells.push(h("td", { class: "n" }, f.samples ?? "–"), h("td", { class: "n" }, num(f.max_abs_err)), h("td", { class: "n" }, num(f.max_rel_err)),
        h("td", { title: f.rtol != null ? `max rel err ≤ ${num(f.rtol)}, plus the differences' own rounding` : "" },
          "allclose" in f ? h("span", { class: `verdict ${f.allclose ? "pass" : "fail"}` }, f.allclose ? "pass" : "FAIL") : "–"));
    }
    const verdict = unwritten ? "todo" : c.suspect ? "suspect" : c.allclose ? "pass" : "fail";
    return h("tr", { class: `${verdict}${inter ? " intermediate" : ""}`, "data-name": key }, ...cells);
  });
  el.replaceChildren(
    ...warnings(data),
    // an exercise with gradients still to write is not a pass, whatever the reference does
    h("p", { class: `check-summary ${check.all_close ? (todo.size ? "todo" : "pass") : "fail"}` },
      check.all_close
        ? todo.size ? "So far (the reference standing in for what is still to write), every gradient matches " : "✓ Every manual gradient matches "
        : "✗ Some manual gradients differ from ",
      h("code", {}, check.reference),
      ` (allclose: |manual − autograd| ≤ atol + rtol·|autograd|, with atol scaled by max|autograd|; exact: bit for bit equal).`,
      fd ? " The fd columns check sampled entries again against float64 central differences." : "",
      todo.size ? ` Still to write: ${[...todo].map((n) => `${n}.g`).join(", ")} (the reference formula stands in until you do).` : ""),
    ...suspectNote(check.suspects || []),
    h("table", { class: "check", id: "check-table" },
      h("thead", {}, h("tr", {}, ...head.map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, ...rows)),
    ...comparison(data.compare),
  );
}

/** Why a failing gradient is wrong (app/check/diagnosis.py); an upstream one is the blame's. */
function diagnosisText(c) {
  const d = c.diagnosis;
  if (!d || d.kind === "upstream") return null;
  return h("small", { class: "why diagnosis", "data-kind": d.kind }, ` ${d.message}`);
}

/** Why a gradient within tolerance is suspect: its error against the built-in formula's. */
function suspectWhy(c) {
  const own = c.builtin_max_abs_err;
  const times = own > 0 ? `${num(c.max_abs_err / own)}×` : "far above";
  return ` within tolerance, but its error is ${times} the built-in formula's (${num(own)}) on this run: more than rounding explains`;
}

function suspectNote(suspects) {
  if (!suspects.length) return [];
  return [h("p", { class: "check-summary suspect", id: "check-suspects" },
    `⚠ Suspect: ${suspects.map((n) => `${n.split(":")[0]}.g`).join(", ")} pass the tolerance, but their error is over 10× what the built-in formulas give on the same run. `,
    "Typical causes: an eps dropped or changed, Bessel's n−1 where the variance is biased (invisible at a small batch).")];
}

function warnings(data) {
  return (data.warnings || []).map((w) => h("p", { class: "notice bad" }, w));
}

/** With compare=true: each strategy's backward time and peak extra memory. */
function comparison(cmp) {
  if (!cmp || !cmp.strategies) return [];
  const rows = Object.entries(cmp.strategies).map(([name, c]) =>
    h("tr", {}, h("th", { scope: "row" }, name), h("td", { class: "n" }, `${num(c.backward_ms)} ms`),
      h("td", { class: "n" }, bytes(c.peak_extra_bytes)), h("td", { class: "n" }, num(c.max_abs_diff))));
  return [
    h("h3", { class: "compare-head" }, "Strategies compared"),
    h("p", { class: "note" }, `The article's formulas run unchunked would materialize ${bytes(cmp.literal_broadcast_bytes)}; this server caps one broadcast chunk at ${bytes(cmp.chunk_bytes)}.`),
    h("table", { class: "check compare", id: "compare-table" },
      h("thead", {}, h("tr", {}, ...["strategy", "backward", "peak extra memory", "max |diff| from manual"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, ...rows)),
  ];
}
