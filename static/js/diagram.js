// The shape-flow diagram: the forward lane (tensors, labelled with their shapes) above, the
// backward lane below, one column per gradient formula with its steps stacked in order.
// A tensor sits right above the column that computes its gradient. Nothing here knows any op:
// steps are drawn by their `action`, and broadcast steps (those carrying a `broadcast` rule)
// are drawn as diamonds sized by the memory they would take.
import { bytes, esc, shape } from "./format.js";

const ACTION_COLOURS = {
  unsqueeze: "#6c8ebf", squeeze: "#6c8ebf", reshape: "#6c8ebf", index: "#8c6d31",
  broadcast: "#d9480f", reduce: "#7048e8", elementwise: "#0b7285", scale: "#2b8a3e",
  mask: "#a61e4d", matmul: "#1864ab",
};
const OTHER_COLOURS = ["#5c940d", "#862e9c", "#e67700", "#495057"];
const ROLE_COLOURS = { param: "#868e96", target: "#868e96", input: "#343a40", activation: "#343a40", output: "#343a40" };
const GRAD_COLOUR = "#2f9e44";
const COL_WIDTH = 104; // px per column: fits "(1000, 784, 50)" in 11 px type
const ROW = 58; // px per backward step (44 when a formula has many steps)

function colourOf(action) {
  if (action in ACTION_COLOURS) return ACTION_COLOURS[action];
  let hash = 0;
  for (const c of action) hash = (hash * 31 + c.charCodeAt(0)) >>> 0;
  return OTHER_COLOURS[hash % OTHER_COLOURS.length];
}

/** Columns: tensors in order of first use in the forward pass; each tensor gets one column
 * per backward entry computing its gradient (or one, if none). Leftover entries go last. */
export function layout(data) {
  const order = [];
  const seen = new Set();
  const add = (name) => !seen.has(name) && (seen.add(name), order.push(name));
  for (const f of data.forward) {
    f.inputs.forEach(add);
    add(f.output);
  }
  Object.keys(data.tensors).forEach(add);
  const entriesOf = {};
  data.backward.forEach((b, i) => (entriesOf[b.grad] ||= []).push(i));
  const columns = [];
  const tensorX = {};
  for (const name of order) {
    const entries = entriesOf[name] || [];
    const start = columns.length;
    if (!entries.length) columns.push({ tensor: name, entry: null });
    for (const e of entries) columns.push({ tensor: name, entry: e });
    tensorX[name] = start + (Math.max(entries.length, 1) - 1) / 2;
    delete entriesOf[name];
  }
  for (const list of Object.values(entriesOf)) for (const e of list) columns.push({ tensor: null, entry: e });
  // Positions: a column with a backward formula is 1 wide, a forward-only one 0.6.
  let at = -0.5;
  for (const c of columns) {
    const w = c.entry == null ? 0.6 : 1;
    c.x = at + w / 2;
    at += w;
  }
  const entryX = {};
  columns.forEach((c) => c.entry != null && (entryX[c.entry] = c.x));
  for (const [name, x] of Object.entries(tensorX)) {
    const lo = columns[Math.floor(x)], hi = columns[Math.ceil(x)];
    tensorX[name] = (lo.x + hi.x) / 2;
  }
  return { columns, tensorX, entryX, width: at + 0.5 };
}

/** Flat list of backward steps in execution order, with where each is drawn. */
export function flatSteps(data, lay = layout(data)) {
  const out = [];
  data.backward.forEach((entry, e) =>
    entry.steps.forEach((step, s) =>
      out.push({ entry, e, s, step, x: lay.entryX[e], y: -1.6 - s, last: s === entry.steps.length - 1 })),
  );
  return out;
}

const isParamLike = (role) => role === "param" || role === "target";

export class Diagram {
  constructor(el, onSelect) {
    this.el = el;
    this.onSelect = onSelect;
    this.highlightTrace = null;
  }

  draw(data) {
    const lay = layout(data);
    const steps = flatSteps(data, lay);
    this.steps = steps;
    const span = lay.width;
    const maxSteps = Math.max(1, ...data.backward.map((b) => b.steps.length));
    const yTop = 2.3;
    const yBottom = -1.6 - maxSteps + 0.35;
    const traces = [];
    const annotations = [];
    const tensorY = (name) => (isParamLike(data.tensors[name]?.role) ? 1.25 : 0);

    // Edges: forward op inputs -> output; tensor -> its gradient column; step -> next step.
    const edge = { x: [], y: [] };
    const dotted = { x: [], y: [] };
    for (const f of data.forward) {
      for (const i of f.inputs) {
        if (!(i in lay.tensorX) || !(f.output in lay.tensorX)) continue;
        edge.x.push(lay.tensorX[i], lay.tensorX[f.output], null);
        edge.y.push(tensorY(i), tensorY(f.output), null);
      }
    }
    for (const [e, x] of Object.entries(lay.entryX)) {
      const name = data.backward[e].grad;
      if (name in lay.tensorX) dotted.x.push(lay.tensorX[name], x, null), dotted.y.push(tensorY(name), -1.6, null);
    }
    for (let i = 1; i < steps.length; i++) {
      if (steps[i].e !== steps[i - 1].e) continue;
      edge.x.push(steps[i - 1].x, steps[i].x, null);
      edge.y.push(steps[i - 1].y, steps[i].y, null);
    }
    traces.push({ type: "scatter", mode: "lines", ...edge, line: { color: "#adb5bd", width: 1.5 }, hoverinfo: "skip", showlegend: false });
    traces.push({ type: "scatter", mode: "lines", ...dotted, line: { color: "#ced4da", width: 1, dash: "dot" }, hoverinfo: "skip", showlegend: false });

    // Forward lane: one node per tensor, labelled "name" over "(shape)".
    const names = Object.keys(lay.tensorX).filter((n) => n in data.tensors);
    const producer = Object.fromEntries(data.forward.map((f) => [f.output, f.code]));
    traces.push({
      type: "scatter", mode: "markers+text", name: "tensor (forward)", showlegend: false,
      x: names.map((n) => lay.tensorX[n]), y: names.map(tensorY),
      text: names.map((n) => `<b>${esc(n)}</b><br>${shape(data.tensors[n].shape)}`),
      textposition: "top center", textfont: { size: 11 },
      marker: { size: 13, color: names.map((n) => ROLE_COLOURS[data.tensors[n].role] || "#343a40"), symbol: names.map((n) => (isParamLike(data.tensors[n].role) ? "square" : "circle")) },
      hovertext: names.map((n) => {
        const t = data.tensors[n];
        return `<b>${esc(n)}</b> ${shape(t.shape)} · ${t.role} · ${bytes(t.bytes)}` + (producer[n] ? `<br><code>${esc(producer[n])}</code>` : "");
      }),
      hoverinfo: "text",
    });

    // Backward lane: one trace per action, so the legend lists whatever actions the trace has.
    const maxBytes = Math.max(1, ...steps.filter((p) => p.step.broadcast).map((p) => p.step.bytes));
    const byAction = new Map();
    steps.forEach((p, i) => {
      const key = p.step.broadcast ? "broadcast" : p.step.action;
      if (!byAction.has(key)) byAction.set(key, []);
      byAction.get(key).push(i);
    });
    for (const [action, idx] of byAction) {
      const pts = idx.map((i) => steps[i]);
      const isB = action === "broadcast";
      traces.push({
        type: "scatter", mode: "markers+text", name: action, legendgroup: action,
        x: pts.map((p) => p.x), y: pts.map((p) => p.y), customdata: idx,
        text: pts.map((p) => `${esc(p.step.action)}<br>${p.last ? "<b>" : ""}${shape(p.step.output)}${p.last ? "</b>" : ""}`),
        textposition: "bottom center", textfont: { size: 10.5, color: isB ? "#c92a2a" : "#212529" },
        marker: {
          symbol: isB ? "diamond" : action === "reduce" ? "triangle-down" : "circle",
          size: pts.map((p) => (isB ? 16 + 26 * Math.sqrt(p.step.bytes / maxBytes) : 12)),
          color: colourOf(action),
          line: { width: pts.map((p) => (p.last ? 3 : 0)), color: GRAD_COLOUR },
        },
        hovertext: pts.map((p) => stepHover(p)),
        hoverinfo: "text", hoverlabel: { align: "left" },
      });
      if (isB) {
        for (const p of pts) {
          annotations.push({
            x: p.x, y: p.y, xshift: 24, yshift: 9, xanchor: "left", showarrow: false,
            text: `<b>${bytes(p.step.bytes)}</b>`, font: { size: 11, color: "#c92a2a" },
          });
        }
      }
    }

    // Column heads of the backward lane: "x.g", the gradient each column computes.
    for (const [e, x] of Object.entries(lay.entryX)) {
      annotations.push({ x, y: -0.95, text: `<b>${esc(data.backward[e].grad)}.g</b>`, showarrow: false, font: { size: 12, color: GRAD_COLOUR } });
    }
    annotations.push(
      { xref: "paper", x: 0, xanchor: "left", y: yTop - 0.05, yanchor: "top", text: "FORWARD  →", showarrow: false, font: { size: 11, color: "#868e96" } },
      { xref: "paper", x: 0, xanchor: "left", y: -0.55, text: "←  BACKWARD (columns run right to left; each runs top to bottom)", showarrow: false, font: { size: 11, color: "#868e96" } },
    );

    // The selected step: a ring drawn over it.
    this.highlightTrace = traces.length;
    traces.push({
      type: "scatter", mode: "markers", x: [null], y: [null], hoverinfo: "skip", showlegend: false, name: "selected",
      marker: { symbol: "circle-open", size: 44, color: "#fab005", line: { width: 4 } },
    });

    const container = this.el.parentElement.clientWidth || 900;
    // Column width from the longest shape label, so small runs fit without scrolling.
    const longest = Math.max(8, ...steps.map((p) => shape(p.step.output).length), ...names.map((n) => shape(data.tensors[n].shape).length));
    const colWidth = Math.min(COL_WIDTH, Math.max(64, longest * 6.6 + 12));
    const width = Math.max(container, Math.round(span * colWidth + 30));
    const height = Math.round((yTop - yBottom) * (maxSteps > 10 ? 44 : ROW) + 40);
    this.el.style.width = `${width}px`;
    const layoutSpec = {
      width, height, margin: { l: 10, r: 10, t: 10, b: 30 },
      xaxis: { visible: false, range: [-0.55, span - 0.45], fixedrange: true },
      yaxis: { visible: false, range: [yBottom, yTop], fixedrange: true },
      showlegend: true, legend: { orientation: "h", x: 0, y: 0, yanchor: "top", font: { size: 11 } },
      annotations, hovermode: "closest", plot_bgcolor: "#fff", paper_bgcolor: "#fff",
      shapes: [{ type: "line", xref: "paper", x0: 0, x1: 1, y0: -0.45, y1: -0.45, line: { color: "#e9ecef", width: 1 } }],
    };
    Plotly.react(this.el, traces, layoutSpec, { displayModeBar: false, responsive: false });
    if (!this.bound) {
      this.el.on("plotly_click", (ev) => {
        const pt = ev.points && ev.points[0];
        if (pt && typeof pt.customdata === "number") this.onSelect(pt.customdata);
      });
      this.bound = true;
    }
    this.el.dataset.steps = String(steps.length);
  }

  highlight(i) {
    const p = this.steps && this.steps[i];
    if (!p) return;
    Plotly.restyle(this.el, { x: [[p.x]], y: [[p.y]] }, [this.highlightTrace]);
    this.el.dataset.selected = String(i);
    this.el.dataset.selectedXy = `${p.x},${p.y}`;
  }
}

function stepHover(p) {
  const st = p.step;
  const lines = [
    `<b>${esc(p.entry.grad)}.g</b>, step ${p.s + 1} of ${p.entry.steps.length}: <b>${esc(st.action)}</b> (${esc(st.op)})`,
    `<code>${esc(st.expr)}</code>`,
    `${st.inputs.map(shape).join(" · ")} → <b>${shape(st.output)}</b>, ${bytes(st.bytes)} if materialized`,
  ];
  if (st.reduced_dims) lines.push(`sums over dims ${st.reduced_dims.join(", ")}`);
  if (st.broadcast) {
    const r = st.broadcast;
    lines.push(`stretches a along dims [${r.a.expanded}], b along dims [${r.b.expanded}]`);
  }
  return lines.join("<br>");
}
