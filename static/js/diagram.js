// The shape-flow diagram, drawn as plain SVG (a redraw takes a few ms): the forward
// lane (tensors, labelled with their shapes, joined through op nodes: @ +, relu, mse) above,
// the backward lane below, one column per gradient formula with its steps stacked in order.
// A tensor sits right above the column that computes its gradient; columns are numbered in the
// order they run (the backward pass starts at the right). Nothing here knows any op's maths:
// steps are drawn by their `action`, and broadcast steps (those carrying a `broadcast` rule)
// are drawn as diamonds sized by the memory they would take (monotone, capped so a diamond is
// never taller than its own label; the label states the bytes). Layout is computed in px from
// measured label widths so no label meets a marker or another label and nothing is clipped.
import { actionColour, actionKey, actionLabel, actionSymbol, ROLE_COLOURS } from "./colours.js";
import { bytes, esc, h, shape } from "./format.js";

// Geometry, in px: x right, y up from the top edge (steps sit at y < 0; `draw` flips y for
// SVG), so marker sizes, label widths and spacing are all measured in the same unit.
const FONT = '"Open Sans", verdana, arial, sans-serif';
const STEP_FONT = 10; // step labels
const FWD_FONT = 11; // forward-lane labels
const HEAD_FONT = 12; // column heads ("x.g")
const LINE = 1.3; // line spacing, in ems
const GAP = 8; // px between neighbouring labels / markers
const DOT = 12; // px, a plain step marker
const DIAMOND_MIN = 11; // px, marker size of the smallest broadcast
const DIAMOND_MAX = 26; // px, of the largest: a diamond spans 1.3 x its size, less than its 3-line label
const DIAMOND_SPAN = 1.3; // a diamond of size s is drawn 1.3 s tall and wide
const MAX_STRETCH = 70; // px a column may widen to fill a wide container

/** Columns: tensors in order of first use in the forward pass; each tensor gets one column
 * per backward entry computing its gradient (or one, if none). Leftover entries go last. */
function layout(data) {
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

/** Label text as it reads: the inverse of format.js's `esc` (`&amp;` last, so an escaped
 * `&lt;` stays the four characters it was). */
const unescape = (t) => t.replace(/&lt;/g, "<").replace(/&gt;/g, ">").replace(/&quot;/g, '"').replace(/&#39;/g, "'").replace(/&amp;/g, "&");

let measurer = null;
/** Width in px of one line of label text as `text` draws it (tags stripped; <b> measured bold). */
function textWidth(line, size) {
  measurer ||= document.createElement("canvas").getContext("2d");
  measurer.font = `${/<b>/.test(line) ? "bold " : ""}${size}px ${FONT}`;
  return measurer.measureText(unescape(line.replace(/<[^>]+>/g, ""))).width;
}
const labelWidth = (text, size) => Math.max(0, ...text.split("<br>").map((l) => textWidth(l, size)));
const labelHeight = (text, size) => text.split("<br>").length * size * LINE;

/** Where everything goes, in px. Steps of a column are spaced by their own label and marker
 * heights; columns are spaced so that no step label, column head or forward label meets the
 * next one, then widened (up to MAX_STRETCH each) to fill `minWidth`. */
function geometry(data, lay, minWidth = 0) {
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
      const head = c.entry == null ? null : `${c.entry + 1} <b>${esc(data.backward[c.entry].grad)}.g</b>`;
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
function flatSteps(data, geo) {
  const byEntry = {};
  for (const c of geo.cols) if (c.entry != null) byEntry[c.entry] = c;
  const out = [];
  data.backward.forEach((entry, e) =>
    byEntry[e].steps.forEach((p) => out.push({ ...p, entry, e, col: byEntry[e], x: Math.round(byEntry[e].x * 10) / 10, y: Math.round(p.y * 10) / 10 })),
  );
  return out;
}

const isParamLike = (role) => role === "param" || role === "target";

const NS = "http://www.w3.org/2000/svg";
/** An SVG element from a tag, attributes and children. */
function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) if (v != null && v !== false) el.setAttribute(k, v);
  for (const c of children.flat()) if (c != null) el.append(c);
  return el;
}

/** Label markup ("a<br><b>(2, 3)</b>") as an SVG <text> of tspans, its block placed at (x, y):
 * `v` = "middle" (centred on y), "top" (top edge at y) or "bottom" (bottom edge at y). */
function text(x, y, markup, size, { anchor = "start", v = "middle", fill = null, cls = null } = {}) {
  const lines = markup.split("<br>");
  const lh = size * LINE;
  const top = v === "middle" ? y - (lines.length * lh) / 2 : v === "bottom" ? y - lines.length * lh : y;
  const t = svg("text", { x, "font-size": size, "text-anchor": anchor, fill, class: cls });
  lines.forEach((line, i) => {
    let bold = false;
    let first = true;
    for (const part of line.split(/(<\/?b>)/)) {
      if (part === "<b>") bold = true;
      else if (part === "</b>") bold = false;
      else if (part) {
        const attrs = { "font-weight": bold ? "bold" : null };
        if (first) Object.assign(attrs, { x, y: (top + i * lh + lh / 2 + size * 0.35).toFixed(1) });
        t.append(svg("tspan", attrs, unescape(part)));
        first = false;
      }
    }
  });
  return t;
}

/** A marker of `size` px (a diamond spans DIAMOND_SPAN x size) centred at (x, y). */
function marker(symbol, x, y, size, fill) {
  const r = size / 2;
  if (symbol === "square") return svg("rect", { x: x - r, y: y - r, width: size, height: size, fill });
  if (symbol === "diamond") {
    const d = (size * DIAMOND_SPAN) / 2;
    return svg("polygon", { points: `${x},${y - d} ${x + d},${y} ${x},${y + d} ${x - d},${y}`, fill });
  }
  if (symbol === "triangle") return svg("polygon", { points: `${x - r * 1.1},${y - r * 0.8} ${x + r * 1.1},${y - r * 0.8} ${x},${y + r * 1.1}`, fill });
  return svg("circle", { cx: x, cy: y, r, fill });
}

const OP_LABELS = { linear: "@ +", mse: "mse", cross_entropy: "cross-entropy", layernorm: "layernorm", batchnorm: "batchnorm" };
const OP_FONT = 10;
const MARGIN = 6;

/** A note for every gradient computed by more than one formula (cross-entropy's out.g:
 * step by step, and fused), or null. */
export function repeatsNote(data) {
  const count = {};
  for (const b of data.backward) count[b.grad] = (count[b.grad] || 0) + 1;
  const twice = Object.entries(count).filter(([, n]) => n > 1);
  if (!twice.length) return null;
  const fused = (g) => Object.hasOwn(data.check.intermediates || {}, `${g}:fused`);
  return h("p", { class: "note repeats" }, ...twice.map(([g, n]) => [
    h("code", {}, `${g}.g`), ` has ${n} columns: the same gradient by ${n} formulas`,
    fused(g) ? " (step by step through every op, then the fused form in one line)" : "",
    "; the check table compares each with autograd. ",
  ]));
}

/** With strategy matmul or einsum, the diagram still draws the broadcast formulas (the
 * lesson); say that the run did not materialize them. */
export function strategyNote(data) {
  const s = data.config.strategy;
  if (s === "broadcast") return null;
  return h("p", { class: "note strategy-note" },
    `Strategy ${s}: the diamonds are the broadcast formulas' picture; this run computed each linear layer's x.g and w.g with ${s === "matmul" ? "@" : "torch.einsum"} and materialized no broadcast intermediate (the step-through shows the code that ran).`);
}

/** The legend: one key per kind of step this run has, drawn as the diagram draws it. */
export function legend(data) {
  const keys = [...new Set(data.backward.flatMap((b) => b.steps.map(actionKey)))];
  const key = (symbol, fill, label, cls = null) =>
    h("span", { class: "key" }, svgKey(symbol, fill, cls), label);
  return [
    key("circle", ROLE_COLOURS.activation, "tensor"),
    key("square", ROLE_COLOURS.param, "parameter / target"),
    key("op", null, "op (forward)"),
    ...keys.map((k) => key(actionSymbol(k), actionColour(k), actionLabel(k))),
    h("span", { class: "key done" }, "bold green shape: the finished gradient"),
  ];
}

function svgKey(symbol, fill) {
  const root = svg("svg", { width: 14, height: 14, viewBox: "0 0 14 14", "aria-hidden": "true" });
  if (symbol === "op") root.append(svg("rect", { class: "op-key", x: 1, y: 3, width: 12, height: 8, rx: 4 }));
  else root.append(marker(symbol, 7, 7, symbol === "diamond" ? 9 : 10, fill));
  return root;
}

export class Diagram {
  /** el: the diagram's box (inside a horizontally scrolling parent); tip: the tooltip box. */
  constructor(el, onSelect, tip) {
    this.el = el;
    this.onSelect = onSelect;
    this.tip = tip;
    this.scale = 1; // presentation mode draws everything larger
    this.tips = [];
    el.addEventListener("click", (ev) => {
      const node = ev.target.closest("[data-step]");
      if (node) this.onSelect(Number(node.dataset.step));
    });
    el.addEventListener("mouseover", (ev) => {
      const node = ev.target.closest("[data-tip]");
      if (node) this.showTip(node, this.tips[Number(node.dataset.tip)]);
    });
    el.addEventListener("mouseout", (ev) => {
      if (ev.target.closest("[data-tip]") && !ev.relatedTarget?.closest?.("[data-tip]")) this.tip.hidden = true;
    });
  }

  /** Tooltip content: an array of lines, each an array of strings and ["code", text] parts. */
  showTip(node, lines) {
    if (!lines || !this.tip) return;
    this.tip.replaceChildren(...lines.map((parts) => h("div", {}, ...parts.map((p) => (Array.isArray(p) ? h(p[0], {}, p[1]) : p)))));
    const box = node.getBoundingClientRect();
    const host = this.tip.offsetParent?.getBoundingClientRect() || { left: 0, top: 0 };
    this.tip.hidden = false;
    this.tip.style.left = `${Math.max(0, box.right - host.left + 8)}px`;
    this.tip.style.top = `${Math.max(0, box.top - host.top)}px`;
  }

  draw(data) {
    const lay = layout(data);
    const margin = { l: MARGIN, r: MARGIN, t: MARGIN, b: MARGIN };
    const scroller = this.el.parentElement;
    const container = (scroller.clientWidth || 900) / this.scale - margin.l - margin.r;
    const geo = geometry(data, lay, container);
    const steps = flatSteps(data, geo);
    this.steps = steps;
    this.tips = [];
    const tipIndex = (lines) => String(this.tips.push(lines) - 1);
    const X = (x) => +(x + margin.l).toFixed(1);
    const Y = (y) => +(-y + margin.t).toFixed(1); // y < 0 below the top edge
    const { tensorX, tensorY } = geo;
    const names = geo.names;
    const width = Math.ceil(geo.width) + margin.l + margin.r;
    const height = Math.ceil(geo.height) + margin.t + margin.b;
    const edges = [];
    const dotted = [];
    const nodes = [];
    const labels = [];
    const line = (list, x0, y0, x1, y1) => list.push(`M${X(x0)},${Y(y0)}L${X(x1)},${Y(y1)}`);

    // Forward lane: inputs -> an op node (@ +, relu, mse ...) -> output, on the activations lane.
    const actNames = names.filter((n) => !isParamLike(data.tensors[n].role));
    for (const f of data.forward) {
      if (!(f.output in tensorX)) continue;
      const ins = f.inputs.filter((i) => i in tensorX);
      const main = ins.find((i) => !isParamLike(data.tensors[i].role));
      const xo = tensorX[f.output], yo = tensorY[f.output];
      const xi = main != null ? tensorX[main] : Math.min(...ins.map((i) => tensorX[i]), xo - 40);
      const label = OP_LABELS[f.op] || f.op;
      const w = textWidth(label, OP_FONT) + 10;
      // the op sits midway along its lane, never over a tensor's marker
      const prevAct = actNames.filter((n) => tensorX[n] < xo).pop();
      const lo = prevAct != null ? tensorX[prevAct] : xi;
      let xop = (Math.max(lo, xi) + xo) / 2;
      if (xo - xop < w / 2 + 9) xop = xo - w / 2 - 9;
      for (const i of ins) line(edges, tensorX[i], tensorY[i], xop, yo);
      line(edges, xop, yo, xo, yo);
      nodes.push(svg("g", { class: "op-node", "data-tip": tipIndex([[["b", f.op]], [["code", f.code]]]) },
        svg("rect", { x: X(xop) - w / 2, y: Y(yo) - 8, width: w, height: 16, rx: 8 }),
        text(X(xop), Y(yo), esc(label), OP_FONT, { anchor: "middle", cls: "op-label" })));
    }
    // tensor -> the column computing its gradient; step -> next step
    for (const c of geo.cols) {
      if (c.entry == null || !(c.tensor in tensorX)) continue;
      line(dotted, tensorX[c.tensor], tensorY[c.tensor], c.x, -(geo.headY - HEAD_FONT * 0.7));
    }
    for (let i = 1; i < steps.length; i++) {
      if (steps[i].e !== steps[i - 1].e) continue;
      line(edges, steps[i - 1].x, steps[i - 1].edgeFrom, steps[i].x, steps[i].y);
    }

    // Forward tensors: "name" over "(shape)", above the marker.
    const producer = Object.fromEntries(data.forward.map((f) => [f.output, f.code]));
    for (const n of names) {
      const t = data.tensors[n];
      const x = X(tensorX[n]), y = Y(tensorY[n]);
      const tip = [[["b", n], ` ${shape(t.shape)} · ${t.role} · ${bytes(t.bytes)}`]];
      if (producer[n]) tip.push([["code", producer[n]]]);
      nodes.push(svg("g", { class: "tensor-node", "data-tip": tipIndex(tip), "data-name": n },
        marker(isParamLike(t.role) ? "square" : "circle", x, y, 13, ROLE_COLOURS[t.role] || "#343a40")));
      labels.push(text(x, y - 9, geo.fwdLabel(n), FWD_FONT, { anchor: "middle", v: "bottom" }));
    }

    // Backward steps: marker by kind; the step that completes a gradient has its shape in green.
    steps.forEach((p, i) => {
      const key = actionKey(p.step);
      const x = X(p.x), y = Y(p.y);
      nodes.push(svg("g", { class: "step-node", "data-step": String(i), "data-action": key, "data-tip": tipIndex(stepTip(p)) },
        marker(actionSymbol(key), x, y, p.size, actionColour(key))));
      const lx = X(p.x + p.dx), ly = Y(p.labelY);
      labels.push(text(lx, ly, p.label, STEP_FONT, {
        anchor: geo.stacked ? "middle" : "start", v: geo.stacked ? "top" : "middle",
        cls: p.isB ? "step-label bcast" : p.last ? "step-label done" : "step-label",
      }));
    });
    for (const c of geo.cols) {
      if (c.head) labels.push(text(X(c.x), Y(-geo.headY), c.head, HEAD_FONT, { anchor: "middle", cls: "col-head" }));
    }
    labels.push(
      text(X(0), Y(-2), "FORWARD  →", 11, { v: "top", cls: "lane" }),
      text(X(0), Y(-geo.backY), "←  BACKWARD: starts at the right; columns are numbered in the order they run, each runs top to bottom", 11, { cls: "lane" }),
    );

    const ring = svg("circle", { class: "ring", r: 0, cx: -100, cy: -100 });
    const root = svg("svg", {
      width: Math.round(width * this.scale), height: Math.round(height * this.scale), viewBox: `0 0 ${width} ${height}`,
      "font-family": FONT, role: "img", "aria-label": "Shape-flow diagram",
    },
      svg("line", { class: "sep", x1: 0, x2: width, y1: Y(-geo.sepY), y2: Y(-geo.sepY) }),
      svg("path", { class: "edges", d: edges.join("") }),
      svg("path", { class: "edges dotted", d: dotted.join("") }),
      ...nodes, ...labels, ring);
    this.ring = ring;
    this.el.replaceChildren(root);
    this.el.style.width = `${Math.round(width * this.scale)}px`;
    this.el.dataset.steps = String(steps.length);
    this.el.dataset.width = String(width);
    // Wider than its box (deep nets): the backward pass starts at the right, so show that end.
    const overflow = root.getBoundingClientRect().width > scroller.clientWidth + 1;
    scroller.classList.toggle("overflowing", overflow);
    const key = JSON.stringify(data.config);
    if (overflow && key !== this.lastConfig) scroller.scrollLeft = scroller.scrollWidth;
    this.lastConfig = key;
    this.markFollow(this.followed);
  }

  /** Mark the slice a followed element sums (`follow`: the server's answer, or null): in its
   * gradient's column, the step that makes the broadcast product (or, for a bias, the step
   * that sums it) gets a ring and a line through it for the slice (followNote says it in words). */
  markFollow(follow) {
    this.followed = follow;
    this.el.querySelector(".follow-mark")?.remove();
    for (const el of this.el.querySelectorAll(".step-node.followed")) el.classList.remove("followed");
    delete this.el.dataset.follow;
    const root = this.el.querySelector("svg");
    if (!follow || !this.steps || !root) return;
    const name = follow.grad.replace(/\.g$/, "");
    const product = shape(follow.product_shape);
    const mine = (p) => p.entry.grad === name && !p.entry.variant;
    let i = this.steps.findIndex((p) => mine(p) && shape(p.step.output) === product);
    if (i < 0) i = this.steps.findIndex((p) => mine(p) && p.step.inputs.some((s) => shape(s) === product));
    if (i < 0) return;
    const p = this.steps[i];
    const x = +(p.x + MARGIN).toFixed(1), y = +(-p.y + MARGIN).toFixed(1);
    const r = Math.max(10, p.extent / 2 + 4);
    const slice = `[${follow.slice.map((s) => (s == null ? ":" : s)).join(", ")}]`;
    root.append(svg("g", { class: "follow-mark", "aria-label": `The followed element sums the slice ${slice} of ${product}` },
      svg("circle", { class: "follow-ring", cx: x, cy: y, r }),
      svg("line", { class: "follow-line", x1: x - r * 0.7, x2: x + r * 0.7, y1: y, y2: y }),
      svg("title", {}, `${follow.grad}[${follow.index.join(", ")}] sums the slice ${slice} of ${product}: ${follow.terms_total} products`)));
    this.el.querySelector(`.step-node[data-step="${i}"]`)?.classList.add("followed");
    this.el.dataset.follow = String(i);
    this.el.dataset.followSlice = slice;
  }

  highlight(i) {
    const p = this.steps && this.steps[i];
    if (!p || !this.ring) return;
    const x = +(p.x + MARGIN).toFixed(1), y = +(-p.y + MARGIN).toFixed(1);
    this.ring.setAttribute("cx", x);
    this.ring.setAttribute("cy", y);
    this.ring.setAttribute("r", Math.max(9, p.extent / 2 + 3)); // clear of the label (at extent/2 + 5)
    for (const el of this.el.querySelectorAll(".step-node.selected")) el.classList.remove("selected");
    this.el.querySelector(`.step-node[data-step="${i}"]`)?.classList.add("selected");
    this.el.dataset.selected = String(i);
    this.el.dataset.selectedXy = `${p.x},${p.y}`;
    // keep the selected step in view when the diagram scrolls sideways
    const scroller = this.el.parentElement;
    const px = x * this.scale;
    if (px < scroller.scrollLeft + 30 || px > scroller.scrollLeft + scroller.clientWidth - 30) {
      scroller.scrollLeft = px - scroller.clientWidth / 2;
    }
  }
}

function stepTip(p) {
  const st = p.step;
  const lines = [
    [["b", `${p.entry.grad}.g`], `, step ${p.s + 1} of ${p.entry.steps.length}: `, ["b", st.action], ` (${st.op})`],
    [["code", st.expr]],
    [`${st.inputs.map(shape).join(" · ")} → `, ["b", shape(st.output)], `, ${bytes(st.bytes)} if materialized`],
  ];
  if (st.reduced_dims) lines.push([`sums over dims ${st.reduced_dims.join(", ")}`]);
  if (st.broadcast) {
    const r = st.broadcast;
    lines.push([`stretches ${st.inputs.length === 2 ? "the first operand" : "a"} along dims [${r.a.expanded}], the second along dims [${r.b.expanded}]`]);
  }
  return lines;
}
