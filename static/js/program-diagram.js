// The shape-flow diagram of any program, as plain SVG: a DAG of the forward's names, one row
// per layer (a name sits one row below the deepest name it reads), the inputs each placed at
// the left of the row above their first reader. Edges come from each forward line's `reads`
// (the server parses them); an edge that a broadcast stretches is orange, one that a
// reduction sums is purple, and the row's broadcasts and reductions are written at its right
// with their shapes and the bytes they make. A name's box is outlined by its gradient's
// verdict. Clicking a name (or Enter on it) selects it.
import { bytes, shape } from "./format.js";

const NS = "http://www.w3.org/2000/svg";
const FONT = 'system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif';
const NODE_H = 32;
const ROW = 52; // px from one row's top to the next
const GAP = 14; // px between boxes in a row
const PAD = 10;
const NOTE_FONT = 10.5;
const MAX_NOTES = 4; // a row's notes written; the rest counted

let measurer = null;
function textWidth(text, size, bold = false) {
  measurer ||= document.createElement("canvas").getContext("2d");
  measurer.font = `${bold ? "bold " : ""}${size}px ${FONT}`;
  return measurer.measureText(text).width;
}

function el(tag, attrs = {}, text = null) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) if (v != null) node.setAttribute(k, v);
  if (text != null) node.textContent = text;
  return node;
}

const sameShape = (a, b) => Array.isArray(a) && Array.isArray(b) && a.length === b.length && a.every((d, i) => d === b[i]);

/** The dims' names a line's shape comment gives (`# (B, nh, T, hs)`), when its rank is the
 * target's: the 4-D shapes of attention read as the chapter writes them. */
function dimNames(line, tensors) {
  const m = /#\s*\(([A-Za-z_][\w]*(?:\s*,\s*[\w*·]+)*)\)/.exec(line.code || "");
  if (!m) return null;
  const names = m[1].split(",").map((d) => d.trim());
  const rank = tensors[line.target]?.shape?.length;
  return names.length === rank ? names : null;
}

const UNFOLD_TIP = (st) => {
  const [n, ckk, l] = st.output;
  return `F.unfold lays the input out as ${st.layout || "(N, C·kh·kw, L)"} = ${shape(st.output)}: ` +
    `for each of the N = ${n} images, one column per position of the sliding window (L = ${l} ` +
    `positions), each column holding the C·kh·kw = ${ckk} values under the window, channel by ` +
    `channel, then row by row of the kernel. A conv is then one matmul: (K, C·kh·kw) @ cols.`;
};

/** What a forward line does that costs or reshapes: its broadcasts (with the alignment: the
 * mask's (T, T) as (1, 1, T, T) over (B, nh)), reductions, views and transposes (a head
 * split), and unfold's layout; and which of the names it reads each one stretches or sums
 * (matched by shape). `dims`: the dims' names of the line's output, when known. */
function costly(line, tensors, dims = null) {
  const notes = [];
  const edges = {};
  const named = (ds, out) => (dims && dims.length === out.length ? ds.map((d) => dims[d]) : ds.map((d) => `dim ${d}`));
  for (const st of line.steps || []) {
    if (st.broadcast) {
      ["a", "b"].forEach((side, k) => {
        const info = st.broadcast[side];
        if (!info || !info.expanded || !info.expanded.length) return;
        const from = st.inputs[k];
        const over = named(info.expanded, st.output).join(", ");
        const aligned = info.aligned && !sameShape(info.aligned, from) ? ` as ${shape(info.aligned)}` : "";
        notes.push({
          kind: "bcast",
          text: `broadcast ${shape(from)}${aligned} over ${over} → ${shape(st.output)} · ${bytes(st.bytes)}`,
          title: `${st.op || "broadcast"}: ${shape(from)} is right-aligned to ${shape(info.aligned || from)} and ` +
            `repeated over ${over} (no copy is made); its gradient sums over ${named(info.grad_sum_dims || info.expanded, st.output).join(", ")}`,
        });
        for (const r of line.reads || []) if (sameShape(tensors[r]?.shape, from)) edges[r] = "bcast";
      });
    } else if (st.action === "reduce") {
      const rd = st.reduced_dims ? ` dim ${st.reduced_dims.join(", ")}` : "";
      notes.push({ kind: "sum", text: `${st.op || "sum"}${rd} → ${shape(st.output)}` });
      for (const r of line.reads || []) if (!edges[r] && sameShape(tensors[r]?.shape, st.inputs[0])) edges[r] = "sum";
    } else if (st.layout) {
      notes.push({ kind: "layout", text: `${st.op} → ${st.layout} = ${shape(st.output)} ⓘ`, title: UNFOLD_TIP(st) });
    } else if (st.op === "transpose" || st.op === "permute") {
      const args = /\.(?:transpose|permute)\(([^()]*)\)$/.exec(st.expr || "");
      const how = args ? `(${args[1]})` : "";
      notes.push({ kind: "view", text: `${st.op}${how} ${shape(st.inputs[0])} → ${shape(st.output)}`, title: `${st.op}${how}: the same numbers, the dims swapped (a view, no copy)` });
    } else if (["view", "reshape"].includes(st.op) && st.inputs?.[0] && st.inputs[0].length !== st.output.length && st.output.length >= 3) {
      const split = st.output.length > st.inputs[0].length;
      notes.push({
        kind: "view",
        text: `${st.op} ${shape(st.inputs[0])} → ${shape(st.output)}${split ? " (split)" : " (merge)"}`,
        title: `${st.op}: the same numbers in the same order, ${split ? "one dim split into several (the heads: C = nh · hs)" : "dims merged into one"}`,
      });
    }
  }
  return { notes, edges };
}

/** A row's notes, the same text once (`×3` for q, k and v's identical head splits). */
function merged(notes) {
  const out = [];
  for (const nt of notes) {
    const same = out.find((o) => o.text === nt.text && o.kind === nt.kind);
    if (same) same.count += 1;
    else out.push({ ...nt, count: 1 });
  }
  return out.map((nt) => (nt.count > 1 ? { ...nt, text: `${nt.text} ×${nt.count}` } : nt));
}

/** Rows and places, in px. */
function flowLayout(data) {
  const tensors = data.tensors;
  // a line that unpacks (`pooled, idx = F.max_pool2d(...)`) draws a node per name it makes
  const lines = data.forward.flatMap((f) => f.target.split(", ").filter((t) => t in tensors)
    .map((t, i) => (t === f.target ? f : { ...f, target: t, steps: i ? [] : f.steps })));
  const layer = {};
  const readers = {};
  for (const f of lines) {
    const reads = (f.reads || []).filter((r) => r in tensors);
    layer[f.target] = 1 + Math.max(0, ...reads.filter((r) => r in layer).map((r) => layer[r]));
    for (const r of reads) (readers[r] ||= []).push(f.target);
  }
  const inputs = Object.keys(tensors).filter((n) => ["input", "param"].includes(tensors[n].role) && readers[n]);
  for (const n of inputs) layer[n] = Math.max(0, Math.min(...readers[n].map((r) => layer[r])) - 1);
  const rows = [];
  const node = {};
  const add = (name, side, line) => {
    const t = tensors[name];
    const sub = `${shape(t.shape)} · ${bytes(t.bytes)}`;
    const w = Math.ceil(Math.max(textWidth(name, 12, true), textWidth(sub, 10.5)) + 16);
    node[name] = { name, side, line, sub, w, row: layer[name], role: t.role };
    (rows[layer[name]] ||= { inputs: [], main: [], notes: [] })[side].push(name);
  };
  inputs.forEach((n) => add(n, "inputs", null));
  const dimsOf = {}; // a name's dims as a shape comment names them, from any line writing it
  for (const f of lines) dimsOf[f.target] ||= dimNames(f, tensors);
  for (const f of lines) {
    add(f.target, "main", f);
    const { notes, edges } = costly(f, tensors, dimsOf[f.target]);
    node[f.target].dims = dimsOf[f.target];
    node[f.target].notes = notes;
    node[f.target].edges = edges;
    rows[layer[f.target]].notes.push(...notes);
  }
  for (let r = 0; r < rows.length; r++) rows[r] ||= { inputs: [], main: [], notes: [] };
  for (const row of rows) row.notes = merged(row.notes);
  // the main column starts right of the widest row of inputs
  const inputW = Math.max(0, ...rows.map((row) => row.inputs.reduce((s, n) => s + node[n].w + GAP, 0)));
  const mainX = PAD + inputW + (inputW ? 10 : 0);
  let width = 0;
  rows.forEach((row, r) => {
    const y = PAD + r * ROW;
    // inputs right-aligned against the main column, in the order of their first reader
    let x = mainX - (inputW ? 10 + GAP : 0);
    for (const n of [...row.inputs].reverse()) {
      x -= node[n].w;
      Object.assign(node[n], { x, y });
      x -= GAP;
    }
    // main names: ordered by where their readings come from
    const bary = (n) => {
      const xs = (node[n].line.reads || []).filter((p) => node[p] && node[p].x != null && node[p].side === "main").map((p) => node[p].x);
      return xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : 0;
    };
    x = mainX;
    for (const n of [...row.main].sort((a, b) => bary(a) - bary(b))) {
      Object.assign(node[n], { x, y });
      x += node[n].w + GAP;
    }
    row.notesX = x + 4;
    row.y = y;
    const noteW = Math.max(0, ...row.notes.slice(0, MAX_NOTES).map((nt) => textWidth(nt.text, NOTE_FONT)));
    width = Math.max(width, row.notesX + noteW + PAD);
  });
  return { rows, node, width: Math.ceil(width), height: PAD * 2 + rows.length * ROW - (ROW - NODE_H) };
}

function edgePath(a, b) {
  const x1 = a.x + a.w / 2;
  const y1 = a.y + NODE_H;
  const x2 = b.x + b.w / 2;
  const y2 = b.y;
  const span = b.row - a.row;
  if (span <= 1) return `M${x1},${y1} L${x2},${y2}`;
  // a skip: bow out (right for the main column, left for an input) so it passes the boxes
  const out = (a.side === "inputs" ? -1 : 1) * (Math.max(a.w, b.w) / 2 + 10 + 5 * Math.min(span, 8));
  return `M${x1},${y1} C${x1 + out},${y1 + ROW * 0.8} ${x2 + out},${y2 - ROW * 0.8} ${x2},${y2}`;
}

/** Draws `data` into `host`; `states`: {name: "match" | "first" | ...}; `onSelect(name)`. */
export function drawFlow(host, data, { states = {}, selected = null, onSelect = () => {} } = {}) {
  const lay = flowLayout(data);
  const svg = el("svg", { width: lay.width, height: lay.height, viewBox: `0 0 ${lay.width} ${lay.height}`, role: "group", "aria-label": "Shape flow of the forward" });
  const defs = el("defs");
  for (const [id, colour] of [["arrow", "#868e96"], ["arrow-bcast", "#d9480f"], ["arrow-sum", "#7048e8"]]) {
    const m = el("marker", { id: `pf-${id}`, viewBox: "0 0 8 8", refX: 7, refY: 4, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
    m.append(el("path", { d: "M0,0 L8,4 L0,8 z", fill: colour }));
    defs.append(m);
  }
  svg.append(defs);
  const edges = el("g", { class: "edges" });
  for (const n of Object.values(lay.node)) {
    if (!n.line) continue;
    for (const r of new Set(n.line.reads || [])) {
      const from = lay.node[r];
      if (!from || from.x == null) continue;
      const kind = n.edges[r] || "plain";
      const marker = kind === "plain" ? "pf-arrow" : `pf-arrow-${kind}`;
      edges.append(el("path", { d: edgePath(from, n), class: `edge ${kind}`, "marker-end": `url(#${marker})`, "data-from": r, "data-to": n.name }));
    }
  }
  svg.append(edges);
  const nodes = el("g", { class: "nodes" });
  for (const n of Object.values(lay.node)) {
    if (n.x == null) continue;
    const state = states[n.name] || "none";
    const g = el("g", { class: `node role-${n.role} st-${state}${selected === n.name ? " selected" : ""}`, transform: `translate(${n.x},${n.y})`, tabindex: 0, role: "button", "data-name": n.name, "aria-label": `${n.name} ${n.sub}` });
    const dims = n.dims ? ` = (${n.dims.join(", ")})` : "";
    g.append(el("title", {}, `${n.name} ${n.sub}${dims}${n.line ? ` · line ${n.line.line}: ${n.line.code}` : ` · ${n.role}`}`));
    g.append(el("rect", { width: n.w, height: NODE_H, rx: 5 }));
    g.append(el("text", { x: n.w / 2, y: 13, class: "name" }, n.name));
    g.append(el("text", { x: n.w / 2, y: 26, class: "sub" }, n.sub));
    g.addEventListener("click", () => onSelect(n.name));
    g.addEventListener("keydown", (ev) => (ev.key === "Enter" || ev.key === " ") && (ev.preventDefault(), onSelect(n.name)));
    nodes.append(g);
  }
  svg.append(nodes);
  const notes = el("g", { class: "notes" });
  for (const row of lay.rows) {
    const shown = row.notes.slice(0, MAX_NOTES);
    const top = row.y + NODE_H / 2 - ((shown.length - 1) * 11) / 2 + 4;
    shown.forEach((nt, i) => {
      const t = el("text", { x: row.notesX, y: top + i * 11, class: `note ${nt.kind}`, "data-kind": nt.kind }, nt.text);
      if (nt.title) t.append(el("title", {}, nt.title));
      notes.append(t);
    });
    if (row.notes.length > MAX_NOTES) notes.lastChild.firstChild.textContent += ` (+${row.notes.length - MAX_NOTES} more)`;
  }
  svg.append(notes);
  host.replaceChildren(svg);
  return lay;
}
