// The shape-flow diagram: the forward lane (tensors, labelled with their shapes) above, the
// backward lane below, one column per gradient formula with its steps stacked in order.
// A tensor sits right above the column that computes its gradient. Nothing here knows any op:
// steps are drawn by their `action`, and broadcast steps (those carrying a `broadcast` rule)
// are drawn as diamonds sized by the memory they would take (monotone, capped so a diamond is
// never taller than its own label; the label states the bytes). Layout is computed in px from
// measured label widths so no label meets a marker or another label and nothing is clipped.
import { bytes, esc, shape } from "./format.js";

const ACTION_COLOURS = {
  unsqueeze: "#6c8ebf", squeeze: "#6c8ebf", reshape: "#6c8ebf", index: "#8c6d31",
  broadcast: "#d9480f", reduce: "#7048e8", elementwise: "#0b7285", scale: "#2b8a3e",
  mask: "#a61e4d", matmul: "#1864ab",
};
const OTHER_COLOURS = ["#5c940d", "#862e9c", "#e67700", "#495057"];
const ROLE_COLOURS = { param: "#868e96", target: "#868e96", input: "#343a40", activation: "#343a40", output: "#343a40" };
const GRAD_COLOUR = "#2f9e44";
// Geometry, in px: the axes run in px (x right, y up from the top edge, so steps sit at y < 0),
// so marker sizes, label widths and spacing are all measured in the same unit.
const FONT = '"Open Sans", verdana, arial, sans-serif';
const STEP_FONT = 10; // step labels
const FWD_FONT = 11; // forward-lane labels
const HEAD_FONT = 12; // column heads ("x.g")
const LINE = 1.3; // Plotly's line spacing, in ems
const GAP = 8; // px between neighbouring labels / markers
const DOT = 12; // px, a plain step marker
const DIAMOND_MIN = 11; // px, marker size of the smallest broadcast
const DIAMOND_MAX = 26; // px, of the largest: a diamond spans 1.3 x its size, less than its 3-line label
const DIAMOND_SPAN = 1.3; // Plotly draws a diamond of size s 1.3 s tall and wide
const MAX_STRETCH = 70; // px a column may widen to fill a wide container
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
  const tensorCols = {};
  for (const name of order) {
    const entries = entriesOf[name] || [];
    tensorCols[name] = [];
    if (!entries.length) entries.push(null);
    for (const e of entries) tensorCols[name].push(columns.length), columns.push({ tensor: name, entry: e });
    delete entriesOf[name];
  }
  for (const list of Object.values(entriesOf)) for (const e of list) columns.push({ tensor: null, entry: e });
  return { columns, tensorCols };
}

let measurer = null;
/** Width in px of one line of label text as Plotly draws it (tags stripped; <b> measured bold). */
function textWidth(line, size) {
  measurer ||= document.createElement("canvas").getContext("2d");
  measurer.font = `${/<b>/.test(line) ? "bold " : ""}${size}px ${FONT}`;
  const plain = line.replace(/<[^>]+>/g, "").replace(/&lt;/g, "<").replace(/&gt;/g, ">").replace(/&amp;/g, "&").replace(/&quot;/g, '"').replace(/&#39;/g, "'");
  return measurer.measureText(plain).width;
}
const labelWidth = (text, size) => Math.max(0, ...text.split("<br>").map((l) => textWidth(l, size)));
const labelHeight = (text, size) => text.split("<br>").length * size * LINE;

/** Where everything goes, in px. Steps of a column are spaced by their own label and marker
 * heights; columns are spaced so that no step label, column head or forward label meets the
 * next one, then widened (up to MAX_STRETCH each) to fill `minWidth`. */
export function geometry(data, lay, minWidth = 0) {
  const maxBytes = Math.max(1, ...data.backward.flatMap((b) => b.steps.filter((st) => st.broadcast).map((st) => st.bytes)));
  const diamond = (b) => DIAMOND_MIN + (DIAMOND_MAX - DIAMOND_MIN) * Math.sqrt(Math.min(1, b / maxBytes));
  const isParam = (name) => isParamLike(data.tensors[name]?.role);
  // Vertical lanes (px below the top edge).
  const fwdLabelH = 2 * FWD_FONT * LINE;
  const paramY = 18 + fwdLabelH + 4 + 7;
  const actY = paramY + 7 + GAP + fwdLabelH + 4 + 7;
  const sepY = actY + 7 + 12;
  const backY = sepY + 11;
  const headY = backY + 20;
  const firstTop = headY + HEAD_FONT * 0.7 + GAP;
  const fwdLabel = (n) => `<b>${esc(n)}</b><br>${shape(data.tensors[n].shape)}`;
  const fwdHalf = (n) => Math.max(7, labelWidth(fwdLabel(n), FWD_FONT) / 2);
  const names = Object.keys(lay.tensorCols).filter((n) => n in data.tensors);

  // Labels go beside (right of) their markers; where that is too wide for the container,
  // below them (narrower columns, taller rows); where that is too wide too, it scrolls.
  let placed = place(false);
  if (placed.natural > minWidth) {
    const stacked = place(true);
    if (stacked.natural < placed.natural) placed = stacked;
  }
  const { cols, tensorX, natural } = placed;
  // Spread the slack of a wide container between the columns.
  const slack = minWidth - natural;
  if (slack > 0 && cols.length > 1) {
    const each = Math.min(MAX_STRETCH, slack / cols.length);
    cols.forEach((c, i) => (c.x += each * (i + 0.5)));
  }
  const height = Math.max(sepY + 60, ...cols.map((c) => c.bottom)) + 6;
  const tx = Object.fromEntries(names.map((n) => [n, tensorX(n)]));
  const ty = Object.fromEntries(names.map((n) => [n, -(isParam(n) ? paramY : actY)]));
  return { cols, names, tensorX: tx, tensorY: ty, fwdLabel, width: Math.max(minWidth, natural), height, sepY, backY, headY, stacked: placed.stacked };

  function place(stacked) {
    // Each column: its steps (marker size, label, vertical place) and its extents about its x.
    const cols = lay.columns.map((c) => {
      const head = c.entry == null ? null : `<b>${esc(data.backward[c.entry].grad)}.g</b>`;
      const steps = c.entry == null ? [] : data.backward[c.entry].steps.map((st, s, all) => {
        const isB = !!st.broadcast, last = s === all.length - 1;
        const size = isB ? diamond(st.bytes) : DOT;
        const out = `${last ? "<b>" : ""}${shape(st.output)}${last ? "</b>" : ""}`;
        const label = isB ? `${esc(st.action)}<br>${out}<br><b>${bytes(st.bytes)}</b>` : `${esc(st.action)}<br>${out}`;
        const extent = isB ? size * DIAMOND_SPAN : size;
        const lh = labelHeight(label, STEP_FONT);
        return { step: st, s, last, isB, size, extent, label, lh, w: labelWidth(label, STEP_FONT), h: stacked ? extent + 2 + lh : Math.max(extent, lh) };
      });
      let y = firstTop;
      for (const p of steps) {
        p.y = -(y + (stacked ? p.extent / 2 : p.h / 2));
        // The label: beside the marker, vertically centred; or under it, top at labelY.
        p.labelY = stacked ? p.y - p.extent / 2 - 1 : p.y;
        p.edgeFrom = stacked ? -(y + p.h) : p.y; // where the edge to the next step may start
        y += p.h + GAP * 0.75;
      }
      const half = Math.max(DOT / 2, ...steps.map((p) => p.extent / 2));
      let left = steps.length ? half : 0, right = left;
      if (stacked) {
        for (const p of steps) p.dx = 0;
        right = left = Math.max(left, ...steps.map((p) => p.w / 2));
      } else if (steps.length) {
        // A label starts just right of its own marker (of the column's widest marker, when
        // that costs no width), so it never touches a diamond.
        for (const p of steps) p.dx = p.extent / 2 + 5;
        right = Math.max(...steps.map((p) => p.dx + p.w));
        for (const p of steps) if (half + 5 + p.w <= right) p.dx = half + 5;
      }
      return { ...c, head, steps, bottom: y, left, right, headHalf: head ? labelWidth(head, HEAD_FONT) / 2 : 0 };
    });

    // Columns left to right, each as far left as its neighbours allow.
    cols.forEach((c, i) => {
      const p = cols[i - 1];
      let x = Math.max(c.left, c.headHalf) + GAP;
      if (p) x = Math.max(x, p.x + p.right + GAP * 1.25 + c.left, p.x + p.headHalf + GAP + c.headHalf, p.x + 7 + GAP + c.left);
      c.x = x;
    });
    // Forward labels on one lane must not meet: shift a tensor's columns (and all after) right.
    const tensorX = (n) => { const idx = lay.tensorCols[n]; return (cols[idx[0]].x + cols[idx[idx.length - 1]].x) / 2; };
    const lastOnLane = {};
    for (const n of names) {
      const lane = isParam(n) ? "param" : "act";
      const prev = lastOnLane[lane];
      if (prev) {
        const need = tensorX(prev) + fwdHalf(prev) + GAP + fwdHalf(n) - tensorX(n);
        if (need > 0) for (let i = lay.tensorCols[n][0]; i < cols.length; i++) cols[i].x += need;
      }
      lastOnLane[lane] = n;
    }
    const first = names.length ? fwdHalf(names[0]) + GAP - tensorX(names[0]) : 0;
    if (first > 0) cols.forEach((c) => (c.x += first));
    const natural = Math.max(0, ...cols.map((c) => c.x + Math.max(c.right, c.headHalf, 7)), ...names.map((n) => tensorX(n) + fwdHalf(n))) + GAP;
    return { cols, tensorX, natural, stacked };
  }
}

/** Flat list of backward steps in execution order, with where each is drawn. */
export function flatSteps(data, geo) {
  const byEntry = {};
  for (const c of geo.cols) if (c.entry != null) byEntry[c.entry] = c;
  const out = [];
  data.backward.forEach((entry, e) =>
    byEntry[e].steps.forEach((p) => out.push({ ...p, entry, e, col: byEntry[e], x: Math.round(byEntry[e].x * 10) / 10, y: Math.round(p.y * 10) / 10 })),
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
    const margin = { l: 6, r: 6, t: 6, b: 34 };
    const container = (this.el.parentElement.clientWidth || 900) - margin.l - margin.r;
    const geo = geometry(data, lay, container);
    const steps = flatSteps(data, geo);
    this.steps = steps;
    const traces = [];
    const annotations = [];
    const { tensorX, tensorY } = geo;

    // Edges: forward op inputs -> output; tensor -> its gradient column; step -> next step.
    const edge = { x: [], y: [] };
    const dotted = { x: [], y: [] };
    for (const f of data.forward) {
      for (const i of f.inputs) {
        if (!(i in tensorX) || !(f.output in tensorX)) continue;
        edge.x.push(tensorX[i], tensorX[f.output], null);
        edge.y.push(tensorY[i], tensorY[f.output], null);
      }
    }
    for (const c of geo.cols) {
      if (c.entry == null || !(c.tensor in tensorX)) continue;
      dotted.x.push(tensorX[c.tensor], c.x, null);
      dotted.y.push(tensorY[c.tensor], -(geo.headY - HEAD_FONT * 0.7), null);
    }
    for (let i = 1; i < steps.length; i++) {
      if (steps[i].e !== steps[i - 1].e) continue;
      edge.x.push(steps[i - 1].x, steps[i].x, null);
      edge.y.push(steps[i - 1].edgeFrom, steps[i].y, null);
    }
    traces.push({ type: "scatter", mode: "lines", ...edge, line: { color: "#adb5bd", width: 1.5 }, hoverinfo: "skip", showlegend: false });
    traces.push({ type: "scatter", mode: "lines", ...dotted, line: { color: "#ced4da", width: 1, dash: "dot" }, hoverinfo: "skip", showlegend: false });

    // Forward lane: one node per tensor, labelled "name" over "(shape)".
    const names = geo.names;
    const producer = Object.fromEntries(data.forward.map((f) => [f.output, f.code]));
    traces.push({
      type: "scatter", mode: "markers+text", name: "tensor (forward)", showlegend: false,
      x: names.map((n) => tensorX[n]), y: names.map((n) => tensorY[n]),
      text: names.map(geo.fwdLabel),
      textposition: "top center", textfont: { size: FWD_FONT },
      marker: { size: 13, color: names.map((n) => ROLE_COLOURS[data.tensors[n].role] || "#343a40"), symbol: names.map((n) => (isParamLike(data.tensors[n].role) ? "square" : "circle")) },
      hovertext: names.map((n) => {
        const t = data.tensors[n];
        return `<b>${esc(n)}</b> ${shape(t.shape)} · ${t.role} · ${bytes(t.bytes)}` + (producer[n] ? `<br><code>${esc(producer[n])}</code>` : "");
      }),
      hoverinfo: "text",
    });

    // Backward lane: one trace per action, so the legend lists whatever actions the trace has.
    // Labels sit right of the markers, aligned per column, in one text-only trace.
    const byAction = new Map();
    steps.forEach((p, i) => {
      const key = p.isB ? "broadcast" : p.step.action;
      if (!byAction.has(key)) byAction.set(key, []);
      byAction.get(key).push(i);
    });
    for (const [action, idx] of byAction) {
      const pts = idx.map((i) => steps[i]);
      const isB = action === "broadcast";
      traces.push({
        type: "scatter", mode: "markers", name: action, legendgroup: action,
        x: pts.map((p) => p.x), y: pts.map((p) => p.y), customdata: idx,
        marker: {
          symbol: isB ? "diamond" : action === "reduce" ? "triangle-down" : "circle",
          size: pts.map((p) => p.size),
          color: colourOf(action),
          line: { width: pts.map((p) => (p.last ? 3 : 0)), color: GRAD_COLOUR },
        },
        hovertext: pts.map((p) => stepHover(p)),
        hoverinfo: "text", hoverlabel: { align: "left" },
      });
    }
    traces.push({
      type: "scatter", mode: "text", showlegend: false, hoverinfo: "skip", name: "labels",
      x: steps.map((p) => p.x + p.dx), y: steps.map((p) => p.labelY),
      text: steps.map((p) => p.label), textposition: geo.stacked ? "bottom center" : "middle right",
      textfont: { size: STEP_FONT, color: steps.map((p) => (p.isB ? "#c92a2a" : "#212529")) },
    });

    // Column heads of the backward lane: "x.g", the gradient each column computes.
    for (const c of geo.cols) {
      if (c.head) annotations.push({ x: c.x, y: -geo.headY, text: c.head, showarrow: false, font: { size: HEAD_FONT, color: GRAD_COLOUR } });
    }
    annotations.push(
      { xref: "paper", x: 0, xanchor: "left", y: -2, yanchor: "top", text: "FORWARD  →", showarrow: false, font: { size: 11, color: "#868e96" } },
      { xref: "paper", x: 0, xanchor: "left", y: -geo.backY, text: "←  BACKWARD (columns run right to left; each runs top to bottom)", showarrow: false, font: { size: 11, color: "#868e96" } },
    );

    // The selected step: a ring drawn over it.
    this.highlightTrace = traces.length;
    traces.push({
      type: "scatter", mode: "markers", x: [null], y: [null], hoverinfo: "skip", showlegend: false, name: "selected",
      marker: { symbol: "circle-open", size: 30, color: "#fab005", line: { width: 4 } },
    });

    const width = Math.ceil(geo.width) + margin.l + margin.r;
    const height = Math.ceil(geo.height) + margin.t + margin.b;
    this.el.style.width = `${width}px`;
    const layoutSpec = {
      width, height, margin, font: { family: FONT },
      xaxis: { visible: false, range: [0, width - margin.l - margin.r], fixedrange: true },
      yaxis: { visible: false, range: [-(height - margin.t - margin.b), 0], fixedrange: true },
      showlegend: true, legend: { orientation: "h", x: 0, y: 0, yanchor: "top", font: { size: 11 } },
      annotations, hovermode: "closest", plot_bgcolor: "#fff", paper_bgcolor: "#fff",
      shapes: [{ type: "line", xref: "paper", x0: 0, x1: 1, y0: -geo.sepY, y1: -geo.sepY, line: { color: "#e9ecef", width: 1 } }],
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
    Plotly.restyle(this.el, { x: [[p.x]], y: [[p.y]], "marker.size": Math.max(22, p.extent + 8) }, [this.highlightTrace]);
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
