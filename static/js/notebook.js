// The notebook widget behind %%backward (app/notebook/widget.py, an anywidget): the program
// page's own views of one answer of POST /api/program's shape: the verdict, the check table,
// the shape flow (with %%forward), each backward line's shapes, and the selected gradient's
// maps (for a %%forward cell, no check yet: its shape flow alone). Plotly is asked of the
// kernel once per page, by the first widget that draws a map.
import { h, shape } from "./format.js";
import { drawFlow } from "./program-diagram.js";
import { checkRows, firstSelection, gradientMaps, heat, states, verdictLine } from "./program-view.js";

let plotly = null;

function loadPlotly(model) {
  if (window.Plotly) return Promise.resolve(window.Plotly);
  plotly ||= new Promise((resolve) => {
    const onMessage = (msg) => {
      if (msg?.type !== "plotly") return;
      model.off("msg:custom", onMessage);
      const script = document.createElement("script");
      // a UMD bundle: hide a page's AMD loader (the classic notebook's RequireJS) so it sets window.Plotly
      script.textContent = `(function (define, module, exports) {\n${msg.source}\n}).call(window);`;
      document.head.append(script);
      resolve(window.Plotly);
    };
    model.on("msg:custom", onMessage);
    model.send({ type: "plotly" });
  });
  return plotly;
}

const HEAD = ["gradient", "line", "shape wanted", "made", "exact", "allclose", "max diff", "state"];

function lineShapes(lines, st = {}) {
  return h("ol", { class: "lines" }, ...lines.map((line) => {
    const out = line.steps?.length ? line.steps[line.steps.length - 1].output : null;
    return h("li", { "data-line": line.line, class: line.grad_of ? `grad st-${st[line.grad_of] || "helper"}` : "helper" },
      h("span", { class: "num" }, String(line.line)), h("code", {}, line.code), h("span", { class: "shape" }, out ? shape(out) : ""),
      line.runs > 1 ? h("span", { class: "muted" }, ` ×${line.runs}`) : null);
  }));
}

function render({ model, el }) {
  const root = h("div", { class: "broadprop" });
  el.append(root);
  let selected = null;

  function draw() {
    const data = model.get("answer");
    const notes = model.get("notes") || [];
    root.replaceChildren();
    for (const note of notes) root.append(h("p", { class: "note bad" }, note));
    if (!data || !data.forward) return;
    if (!data.check) { // a %%forward cell: its shape flow, before any gradient is written
      const flow = h("div", { class: "flow" });
      root.append(h("p", { class: "verdict-line", "data-verdict": "forward" }, `Forward ran · loss ${data.loss == null ? "–" : data.loss.toPrecision(5)} · now write the backward under %%backward`),
        h("details", { open: true }, h("summary", {}, "Shape flow"), flow),
        h("details", {}, h("summary", {}, "Each forward line's shape"), lineShapes(data.forward)));
      drawFlow(flow, data);
      return;
    }
    const st = states(data.check);
    if (!selected || !(selected in data.check.tensors)) selected = firstSelection(data);
    const [kind, html] = verdictLine(data, st);
    const verdict = h("p", { class: "verdict-line", "data-verdict": kind });
    verdict.innerHTML = html;
    root.append(verdict);
    const e = data.backward_error;
    if (e) root.append(h("div", { class: "error-box" }, h("p", {}, h("b", {}, `Line ${e.line}: `), e.message.split("\n")[0]), e.hint ? h("p", { class: "hint" }, "Hint: ", e.hint) : null));
    const tbody = h("tbody", {}, ...checkRows(data, st, selected, select));
    root.append(h("div", { class: "table-scroll" }, h("table", { class: "checks" }, h("thead", {}, h("tr", {}, ...HEAD.map((t) => h("th", {}, t)))), tbody)));
    if (data.forward.length) {
      const flow = h("div", { class: "flow" });
      root.append(h("details", { open: true }, h("summary", {}, "Shape flow"), flow));
      drawFlow(flow, data, { states: st, selected, onSelect: select });
    }
    root.append(h("details", {}, h("summary", {}, "Each backward line's shape"), lineShapes(data.backward, st)));
    const title = h("p", { class: "maps-title" });
    const maps = { manual: h("div", { class: "map" }), auto: h("div", { class: "map" }), difference: h("div", { class: "map" }) };
    root.append(title, h("div", { class: "maps" },
      h("figure", {}, h("figcaption", {}, "manual"), maps.manual),
      h("figure", {}, h("figcaption", {}, "autograd"), maps.auto),
      h("figure", {}, h("figcaption", {}, "|manual − autograd| ÷ tolerance"), maps.difference)));

    async function drawMaps() {
      const name = selected;
      const row = data.check.tensors[name];
      if (!name || !data.gradients[name]) return;
      title.replaceChildren(h("b", {}, `Gradient of ${name} `), h("span", { class: "muted" },
        `${shape(data.gradients[name].shape)} · ${row.written ? `written at line ${row.lines.join(", ")} as ${row.spelling}` : "not written: autograd's only"}`));
      root.dataset.maps = "pending";
      await loadPlotly(model);
      if (selected !== name) return;
      const m = gradientMaps(data, name);
      heat(maps.manual, m.manual, { zmax: m.zmax });
      heat(maps.auto, m.auto, { zmax: m.zmax });
      heat(maps.difference, m.difference, { tolerance: true });
      root.dataset.maps = name;
    }

    function select(name) {
      selected = name;
      for (const tr of tbody.rows) tr.classList.toggle("selected", tr.dataset.name === name);
      for (const g of root.querySelectorAll(".flow .node")) g.classList.toggle("selected", g.dataset.name === name);
      drawMaps();
    }
    drawMaps();
  }

  draw();
  model.on("change:answer", draw);
  model.on("change:notes", draw);
  return () => {
    model.off("change:answer", draw);
    model.off("change:notes", draw);
  };
}

export default { render };
