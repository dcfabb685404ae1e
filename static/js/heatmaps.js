// One Plotly heatmap per gradient, each in its own chart: a diverging scale centred at zero,
// 1-D tensors as a strip, and a notice with the true shape when the view is downsampled.
// Charts are kept between runs and updated with Plotly.react; a chart off screen is drawn
// when it comes near the viewport or when the browser is idle, whichever comes first.
//
// Views: manual, autograd (the same scale: the true max |value| of the tensor, so a
// downsampled map's colours agree with its stats), and the difference in units of the check's
// own tolerance, |manual − autograd| / (atol + rtol·|autograd|) (the server's
// tolerance_heatmap, each block's largest): up to 1 passes and stays pale, over 1 turns red,
// deeper on a log scale, so rounding noise never looks saturated and a wrong formula lights up.
import { loadPlotly, plotlyReady } from "./plotly-ready.js";
import { blame, blameText } from "./blame.js";
import { DIVERGING, toleranceScale } from "./colours.js";
import { h, num, shape } from "./format.js";

export const VIEWS = {
  manual: { label: "manual", title: (n) => `${n}.g (manual)` },
  autograd: { label: "autograd", title: (n) => `${n}.grad (autograd)` },
  difference: { label: "manual − autograd", title: (n) => `|${n}.g − ${n}.grad| ÷ tolerance` },
};


/** Which cells a view draws: downsampled maps draw each block's entry of largest magnitude
 * (`extreme`, sign kept) so that no extreme averages away; `cells: "mean"` draws block means. */
function viewHeatmap(g, view, cells = "extreme") {
  const hm = view === "autograd" ? g.reference_heatmap : view === "difference" ? g.tolerance_heatmap || g.diff_heatmap : g.heatmap;
  if (view !== "difference" && cells === "extreme" && hm.extreme) return { ...hm, z: hm.extreme, kind: "extreme" };
  return { ...hm, kind: view === "difference" ? "extreme" : "mean" };
}

function axisTitles(shp) {
  if (shp.length <= 1) return { x: `index (0 … ${(shp[0] ?? 1) - 1})`, y: "" };
  const last = shp.length - 1;
  const lead = last === 1 ? "dim 0" : `dims 0–${last - 1} flattened`;
  return { x: `dim ${last} (0 … ${shp[last] - 1})`, y: `${lead} (0 … ${shp.slice(0, last).reduce((a, b) => a * b, 1) - 1})` };
}

/** Chart size from the true aspect ratio, within bounds that keep every chart readable and
 * never wider than `room` (the container, on a phone). */
function chartSize(rows, cols, oneD, room, big = false) {
  const k = big ? 1.4 : 1; // presentation mode: larger charts for 18 px text
  if (oneD) return { width: Math.round(Math.min(room, Math.min(600 * k, Math.max(150 * k, cols * 14)) + 90 * k)), height: Math.round(110 * k) };
  const height = Math.round(330 * k);
  const plot = Math.min(560 * k, Math.max(90 * k, (height - 60) * (cols / rows)));
  return { width: Math.round(Math.min(room, plot + 150 * k)), height };
}

/** Integer ticks in the tensor's index units: every index when few, else about 6 round steps. */
function ticks(n, px) {
  const most = Math.max(2, Math.floor(px / 30));
  if (n <= most) return { tickvals: [...Array(n).keys()] };
  const raw = n / Math.min(6, most);
  const p = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * p).find((v) => v >= raw);
  return { tickmode: "linear", tick0: 0, dtick: step };
}

/** A drawn cell in the tensor's own terms: `row 3, col 5`, or a block's ranges (downsampled),
 * `rows 0–19, cols 40–59`; a 1-D tensor as `b1[4]` or `b1[40–59]`. */
function cellLabel(name, dims, hm, row, col) {
  const span = (i, b, n) => (b > 1 ? `${i * b}–${Math.min(n, (i + 1) * b) - 1}` : String(i));
  const cols = span(col, hm.col_block, hm.cols);
  if (dims.length <= 1) return `${name}[${cols}]`;
  const plural = (b) => (b > 1 ? "s" : "");
  return `row${plural(hm.row_block)} ${span(row, hm.row_block, hm.rows)}, col${plural(hm.col_block)} ${cols}`;
}

const maxAbs = (...xs) => Math.max(1e-30, ...xs.filter((v) => v != null && Number.isFinite(v)).map(Math.abs));

/** |difference| divided by the check's tolerance, cell by cell: atol + rtol·|autograd|,
 * with autograd's value of the same cell (its block mean where downsampled: approximate). */
function toleranceScaled(diff, ref, check) {
  return diff.z.map((row, i) => row.map((d, j) => {
    if (d == null) return null;
    const a = ref ? Math.abs(ref.z[i][j] ?? 0) : 0;
    return Math.abs(d) / ((check.atol ?? 0) + check.rtol * a || 1e-30);
  }));
}

function caption(name, g, view, hm, data) {
  const s = g.stats;
  const down = hm.row_block > 1 || hm.col_block > 1;
  const parts = [h("b", {}, VIEWS[view].title(name)), ` ${shape(g.shape)}`];
  const check = data.check.tensors[name];
  if (view === "difference" && check) {
    parts.push(h("span", { class: "stats" },
      `max |manual − autograd| ${num(check.max_abs_err)} · tolerance ${num(check.atol)} + ${num(check.rtol)}·|autograd| · `,
      h("b", { class: check.allclose ? "ok" : "bad" }, check.allclose ? "within it (|cell| ≤ 1)" : "beyond it")));
  } else {
    parts.push(h("span", { class: "stats" }, `min ${num(s.min)} · max ${num(s.max)} · mean ${num(s.mean)} · ‖·‖ ${num(s.norm)}`));
  }
  const notices = [];
  if (down) {
    const what = hm.kind === "extreme"
      ? (view === "difference" ? "the block's largest |difference| ÷ tolerance" : "the block's entry of largest magnitude (sign kept)")
      : "the block mean (colours span the means' own range)";
    notices.push(h("p", { class: "notice downsampled" },
      `Downsampled: true shape ${shape(g.shape)}; each cell is ${what} of a ${hm.row_block} × ${hm.col_block} block (${hm.z.length} × ${hm.z[0].length} cells shown).`));
  }
  if (g.nonfinite) notices.push(h("p", { class: "notice bad" }, `${g.nonfinite} entries are not finite (NaN or ±inf); drawn as gaps.`));
  return { parts, notices };
}

/** A gradient that fails the check is marked in every view (the card's border, a badge with
 * its error and its cause), with a way to its difference map. */
function failing(name, data, view, wrong) {
  const check = data.check.tensors[name];
  if (!check || check.allclose || (data.todo || []).includes(name)) return [];
  const why = blameText(wrong, name);
  return [h("p", { class: "notice bad fail-badge" },
    h("b", {}, "✗ differs from autograd"), ` · max rel err ${num(check.max_rel_err)} · max abs err ${num(check.max_abs_err)}`,
    why ? h("span", { class: "blame" }, ` · ${why}`) : "",
    view !== "difference"
      ? h("button", { type: "button", class: "secondary small show-difference",
        onclick: (ev) => ev.target.closest(".heatmaps").dispatchEvent(new CustomEvent("bp:show-difference")) }, "show the difference")
      : "")];
}

/** Every gradient's card; charts drawn now when on screen, later when not. */
export class Heatmaps {
  constructor(container, onPending, onCell = null) {
    this.container = container;
    this.onPending = onPending; // (on screen left, all left) -> void
    this.onCell = onCell; // (name, gradient, heatmap drawn, row, col) -> void: a cell was clicked
    this.cards = new Map(); // name -> {card, chart, head, notes, spec, drawn}
    this.visible = new Set();
    this.idle = null;
    this.observer = new IntersectionObserver((entries) => {
      for (const e of entries) {
        const name = e.target.dataset.name;
        if (e.isIntersecting) this.visible.add(name);
        else this.visible.delete(name);
      }
      this.flush(true);
    }, { rootMargin: "150px" });
  }

  /** Show `data` in `view`; `cells`: "extreme" or "mean" for downsampled maps. */
  update(data, view, cells = "extreme") {
    const names = Object.keys(data.gradients);
    if (names.join() !== [...this.cards.keys()].join()) this.rebuild(names);
    // a section hidden by presentation mode's tabs has no width: the page's main column then
    const width = this.container.clientWidth || document.getElementById("main")?.clientWidth - 40 || 0;
    const room = Math.max(160, width - 20);
    const wrong = blame(data);
    for (const name of names) {
      const g = data.gradients[name];
      const hm = viewHeatmap(g, view, cells);
      const c = this.cards.get(name);
      const { parts, notices } = caption(name, g, view, hm, data);
      c.head.replaceChildren(...parts);
      const badge = failing(name, data, view, wrong);
      c.card.classList.toggle("failing", badge.length > 0);
      c.notes.replaceChildren(...badge, ...notices);
      c.spec = spec(name, g, view, hm, data, room);
      if (c.hit && (c.hit.hm.row_block !== hm.row_block || c.hit.hm.col_block !== hm.col_block || c.hit.hm.rows !== hm.rows || c.hit.hm.cols !== hm.cols)) c.cursor = null;
      c.hit = { name, g, hm };
      c.spec.layout.shapes = this.shapes(c);
      c.card.style.width = `${c.spec.layout.width + 18}px`;
      c.chart.style.height = `${c.spec.layout.height}px`;
      c.drawn = false;
      c.chart.dataset.view = view;
      c.chart.dataset.kind = hm.kind;
    }
    this.flush(false);
  }

  rebuild(names) {
    for (const c of this.cards.values()) {
      this.observer.unobserve(c.card);
      if (window.Plotly) Plotly.purge(c.chart);
    }
    this.cards.clear();
    this.visible.clear();
    for (const name of names) {
      const keys = this.onCell ? ": arrow keys move between cells, Enter follows one" : "";
      const chart = h("div", { class: "chart heatmap", id: `heatmap-${name}`, "data-name": name, role: "img",
        "aria-label": `Heatmap of the gradient of ${name}${keys}`, ...(this.onCell ? { tabindex: "0" } : {}) });
      const head = h("figcaption", {});
      const notes = h("div", { class: "notes" });
      const readout = h("p", { class: "cell-readout", "aria-live": "polite", hidden: true });
      const card = h("figure", { class: "heatmap-card", "data-name": name }, head, notes, chart, readout);
      const c = { card, chart, head, notes, readout, spec: null, drawn: false, cursor: null, mark: null };
      if (this.onCell) this.keyboard(c);
      this.cards.set(name, c);
    }
    this.container.replaceChildren(...[...this.cards.values()].map((c) => c.card));
    for (const c of this.cards.values()) this.observer.observe(c.card);
  }

  /** Draw what is on screen now; the rest one chart per idle period. */
  flush(fromObserver) {
    if (!window.Plotly) {
      if (!this.waiting) (this.waiting = true), plotlyReady.then(() => this.flush(false));
      loadPlotly();
      return this.report();
    }
    for (const [name, c] of this.cards) if (!c.drawn && this.visible.has(name)) this.drawOne(c);
    if (!fromObserver || this.pendingAll()) this.scheduleIdle();
    this.report();
  }

  drawOne(c) {
    Plotly.react(c.chart, c.spec.data, c.spec.layout, { displayModeBar: false, responsive: false });
    c.drawn = true;
    if (this.onCell && !c.clickable) {
      c.clickable = true; // once per chart: Plotly keeps its listeners across react()
      c.chart.on("plotly_click", (ev) => {
        const pt = ev.points && ev.points[0];
        if (!pt || !Array.isArray(pt.pointNumber) || !c.hit) return;
        const [row, col] = pt.pointNumber; // the heatmap cell (a block, when downsampled)
        this.pickCell(c, row, col);
      });
    }
  }

  /** Follow cell (row, col) of card c: mark it, keep the keyboard's cursor there. */
  pickCell(c, row, col) {
    c.cursor = { row, col };
    this.onCell(c.hit.name, c.hit.g, c.hit.hm, row, col);
  }

  /** The keyboard's way in: the chart takes focus (Tab), arrow keys move a dashed cursor over
   * its cells (Home/End: the row's ends, PageUp/PageDown: 10 rows), Enter or Space follows the
   * cell under it, as a click does. The readout below the chart says where the cursor is. */
  keyboard(c) {
    const MOVES = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0], PageUp: [-10, 0], PageDown: [10, 0] };
    c.chart.addEventListener("focus", () => {
      if (!c.hit) return;
      c.cursor = c.cursor || (c.mark ? { ...c.mark } : { row: 0, col: 0 });
      this.showCursor(c);
    });
    c.chart.addEventListener("blur", () => {
      c.readout.hidden = true;
      this.reshape(c);
    });
    c.chart.addEventListener("keydown", (ev) => {
      if (!c.hit || !c.cursor || ev.altKey || ev.ctrlKey || ev.metaKey) return;
      const nr = c.hit.hm.z.length, nc = c.hit.hm.z[0].length;
      const { row, col } = c.cursor;
      if (MOVES[ev.key]) {
        const [dr, dc] = MOVES[ev.key];
        c.cursor = { row: Math.max(0, Math.min(nr - 1, row + dr)), col: Math.max(0, Math.min(nc - 1, col + dc)) };
      } else if (ev.key === "Home" || ev.key === "End") {
        c.cursor = { row, col: ev.key === "Home" ? 0 : nc - 1 };
      } else if (ev.key === "Enter" || ev.key === " ") {
        this.pickCell(c, row, col);
      } else return;
      ev.preventDefault();
      ev.stopPropagation(); // the page's own arrow keys (steps, presentation sections) wait
      this.showCursor(c);
    });
  }

  showCursor(c) {
    const { row, col } = c.cursor;
    const hm = c.hit.hm;
    const v = hm.z[row]?.[col];
    c.readout.hidden = false;
    c.readout.dataset.row = String(row);
    c.readout.dataset.col = String(col);
    c.readout.textContent = `${cellLabel(c.hit.name, c.hit.g.shape, hm, row, col)}: ${v == null ? "no value" : num(v)} · Enter follows it`;
    this.reshape(c);
  }

  /** Ring the followed element's cell (null clears): `index` is the tensor's own index. */
  mark(name, index) {
    for (const [n, c] of this.cards) {
      const was = c.mark;
      c.mark = null;
      if (n === name && index && c.hit) {
        const hm = c.hit.hm, dims = c.hit.g.shape;
        let row = 0;
        for (let d = 0; d < dims.length - 1; d++) row = row * dims[d] + index[d];
        const col = index[index.length - 1] ?? 0;
        c.mark = { row: Math.floor(row / hm.row_block), col: Math.floor(col / hm.col_block) };
        c.chart.dataset.mark = `${c.mark.row},${c.mark.col}`;
      } else delete c.chart.dataset.mark;
      if (was || c.mark) this.reshape(c);
    }
  }

  /** The marks on one chart: the followed cell (solid) and the keyboard's cursor (dashed). */
  shapes(c) {
    if (!c.hit) return [];
    const hm = c.hit.hm, oneD = c.hit.g.shape.length <= 1;
    const rect = ({ row, col }, line) => {
      const x = [col * hm.col_block, Math.min(hm.cols, (col + 1) * hm.col_block)].map((v) => v - 0.5);
      const y = oneD ? [-0.5, 0.5] : [row * hm.row_block, Math.min(hm.rows, (row + 1) * hm.row_block)].map((v) => v - 0.5);
      return { type: "rect", xref: "x", yref: "y", x0: x[0], x1: x[1], y0: y[0], y1: y[1], line, fillcolor: "rgba(0,0,0,0)" };
    };
    const out = [];
    if (c.mark) out.push(rect(c.mark, { color: "#111", width: 3 }));
    if (c.cursor && document.activeElement === c.chart) out.push(rect(c.cursor, { color: "#0b5ed7", width: 2, dash: "dot" }));
    return out;
  }

  reshape(c) {
    if (!c.spec) return;
    c.spec.layout.shapes = this.shapes(c);
    if (c.drawn && window.Plotly) Plotly.relayout(c.chart, { shapes: c.spec.layout.shapes });
  }

  scheduleIdle() {
    if (this.idle != null) return;
    const idle = window.requestIdleCallback || ((fn) => setTimeout(() => fn({ timeRemaining: () => 8 }), 30));
    this.idle = idle((deadline) => {
      this.idle = null;
      for (const c of this.cards.values()) {
        if (c.drawn) continue;
        this.drawOne(c);
        if (deadline.timeRemaining() < 8) break;
      }
      if (this.pendingAll()) this.scheduleIdle();
      this.report();
    }, { timeout: 1000 });
  }

  pendingAll() {
    return [...this.cards.values()].filter((c) => !c.drawn).length;
  }

  report() {
    const onScreen = [...this.cards].filter(([name, c]) => !c.drawn && this.visible.has(name)).length;
    this.onPending(onScreen, this.pendingAll());
  }
}

/** Plotly's data and layout for one chart. */
function spec(name, g, view, hm, data, room) {
  const oneD = g.shape.length <= 1;
  const rows = hm.rows;
  const cols = hm.cols;
  const font = document.body.classList.contains("present") ? 18 : 0; // a projector: 18 px text
  const { width, height } = chartSize(rows, cols, oneD, room, !!font);
  const titles = axisTitles(g.shape);
  // Cell edges in the tensor's own index units (n + 1 of them), so a single cell spans the
  // whole tensor (max_cells=1 draws), and hover and ticks give true positions.
  const nr = hm.z.length, nc = hm.z[0].length;
  const xs = [...Array(nc + 1).keys()].map((j) => Math.min(cols, j * hm.col_block) - 0.5);
  const ys = [...Array(nr + 1).keys()].map((i) => Math.min(rows, i * hm.row_block) - 0.5);
  const blocky = hm.row_block > 1 || hm.col_block > 1;
  let z = hm.z;
  let colour = { colorscale: DIVERGING, zmid: 0 };
  let what = view === "difference" ? "difference" : "value";
  if (view === "difference") {
    // the server's |difference| ÷ tolerance, or (an older answer) the same from the maps
    const check = data.check.tensors[name] || { rtol: 0, atol: 0 };
    ({ z, colour } = toleranceScale(g.tolerance_heatmap ? hm.z : toleranceScaled(hm, g.reference_heatmap, check)));
    what = "|difference| ÷ tolerance";
  } else {
    const s = g.stats;
    // block means are far smaller than the extremes: on the tensor's range they would look
    // blank, so they span their own (the notice says so)
    const zmax = hm.kind === "mean" && blocky ? maxAbs(...hm.z.flat()) : maxAbs(s.min, s.max, ...hm.z.flat());
    colour = { ...colour, zmin: -zmax, zmax };
  }
  const blockWord = hm.kind === "extreme" ? "largest |·| in the block" : "block mean";
  // the hover names the cell's whole range: a block's centre is not where its largest value sits
  const text = hm.z.map((row, i) => row.map((_, j) => cellLabel(name, g.shape, hm, i, j)));
  const trace = {
    type: "heatmap", z, x: xs, y: oneD ? [-0.5, 0.5] : ys, text, ...colour,
    colorbar: { thickness: 12, len: 1, outlinewidth: 0, tickformat: ".3~g", ...(oneD ? { nticks: 3 } : {}), ...(font ? { tickfont: { size: font } } : {}), ...colour.colorbar },
    hoverongaps: false,
    hovertemplate: `%{text}${blocky ? ` (${blockWord})` : ""}<br>${what} %{z:.4g}<extra></extra>`,
  };
  if (colour.customdata) trace.hovertemplate = trace.hovertemplate.replace("%{z:.4g}", "%{customdata:.3g}");
  const layout = {
    width, height, margin: { l: oneD ? 12 : 58, r: 8, t: 6, b: 40 },
    xaxis: { title: { text: titles.x, font: { size: 11 } }, range: [-0.5, cols - 0.5], ...ticks(cols, width - (oneD ? 100 : 150)), tickfont: { size: 10 }, showgrid: false, zeroline: false },
    yaxis: oneD
      ? { visible: false, range: [0.5, -0.5] }
      : { title: { text: titles.y, font: { size: 11 } }, range: [rows - 0.5, -0.5], ...ticks(rows, height - 60), tickfont: { size: 10 }, showgrid: false, zeroline: false },
    plot_bgcolor: "#e9ecef", paper_bgcolor: "#fff",
  };
  if (font) {
    layout.margin = { ...layout.margin, l: oneD ? 12 : 96, b: 64 };
    for (const axis of [layout.xaxis, layout.yaxis]) if (axis.title) (axis.title.font.size = font), (axis.tickfont.size = font);
  }
  return { data: [trace], layout };
}
