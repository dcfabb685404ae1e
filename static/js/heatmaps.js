// One Plotly heatmap per gradient, each in its own chart: a diverging scale centred at zero,
// 1-D tensors as a strip, and a notice with the true shape when the view is block-averaged.
import { h, num, shape } from "./format.js";

export const VIEWS = {
  manual: { label: "manual", title: (n) => `${n}.g (manual)` },
  autograd: { label: "autograd", title: (n) => `${n}.grad (autograd)` },
  difference: { label: "difference ÷ tolerance", title: (n) => `|${n}.g − ${n}.grad| ÷ tol`, cell: "the largest |difference| ÷ tolerance" },
};

// Blue for negative, white at zero, red for positive.
const DIVERGING = [
  [0, "#2166ac"], [0.25, "#67a9cf"], [0.45, "#d1e5f0"], [0.5, "#f7f7f7"],
  [0.55, "#fddbc7"], [0.75, "#ef8a62"], [1, "#b2182b"],
];

/** The heatmap a view needs from one gradient entry: the page always asks for autograd's
 * heatmaps too (api.js), so every response carries all three. */
export function viewHeatmap(g, view) {
  if (view === "autograd") return g.reference_heatmap;
  if (view === "difference") return g.tolerance_heatmap || g.diff_heatmap;
  return g.heatmap;
}

function axisTitles(shp) {
  if (shp.length <= 1) return { x: `index (0 … ${(shp[0] ?? 1) - 1})`, y: "" };
  const last = shp.length - 1;
  const lead = last === 1 ? "dim 0" : `dims 0–${last - 1} flattened`;
  return { x: `dim ${last} (0 … ${shp[last] - 1})`, y: `${lead} (0 … ${shp.slice(0, last).reduce((a, b) => a * b, 1) - 1})` };
}

/** Chart size from the true aspect ratio, within bounds that keep every chart readable. */
function chartSize(rows, cols, oneD) {
  if (oneD) return { width: Math.round(Math.min(600, Math.max(150, cols * 14)) + 130), height: 132 };
  const height = 330;
  const plot = Math.min(560, Math.max(90, (height - 60) * (cols / rows)));
  return { width: Math.round(plot + 200), height };
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

/** The difference in units of the check's tolerance, |manual − autograd| / (atol + rtol·|autograd|):
 * up to 1 passes and stays pale grey; over 1 fails and turns red, deeper on a log scale (1 + log10),
 * so a wrong formula lights up exactly where it is wrong and rounding noise never does. */
function toleranceTrace(hm, name, oneD, xs, ys, blocky) {
  const shown = (r) => (r == null ? null : r <= 1 ? r : 1 + Math.log10(r));
  const z = hm.z.map((row) => row.map(shown));
  const top = Math.max(2, ...z.flat().filter((v) => v != null));
  const edge = 1 / top; // where the scale crosses 1
  const step = Math.max(1, Math.ceil((top - 1) / 5)); // decades per tick, at most ~5 above 1
  const tickvals = [0, 0.5, 1];
  for (let v = 1 + step; v <= top; v += step) tickvals.push(v);
  return {
    type: "heatmap", z, customdata: hm.z, x: xs, y: oneD ? [0] : ys, zmin: 0, zmax: top,
    colorscale: [[0, "#f8f9fa"], [edge, "#ced4da"], [Math.min(1, edge + 1e-6), "#fcbba1"], [Math.min(1, edge + (1 - edge) / 3), "#fb6a4a"], [1, "#99000d"]],
    colorbar: {
      title: { text: "|diff| ÷ tol", side: "right" }, thickness: 12, len: 1, outlinewidth: 0,
      tickvals, ticktext: tickvals.map((v) => (v <= 1 ? String(v) : `${10 ** (v - 1)}`.replace(/^(1)(0{3,})$/, (_, a, zs) => `1e${zs.length}`))),
    },
    hoverongaps: false,
    hovertemplate: `${oneD ? `${name}.g[%{x}]` : "row %{y}, col %{x}"}${blocky ? " (largest in block)" : ""}<br>|diff| ÷ tolerance = %{customdata:.3g}<extra></extra>`,
  };
}

export function drawHeatmaps(container, data, view) {
  for (const el of container.querySelectorAll(".chart")) Plotly.purge(el);
  const cards = [];
  for (const [name, g] of Object.entries(data.gradients)) {
    const hm = viewHeatmap(g, view);
    const oneD = g.shape.length <= 1;
    const rows = hm.rows ?? hm.z.length * hm.row_block;
    const cols = hm.cols ?? hm.z[0].length * hm.col_block;
    const down = hm.row_block > 1 || hm.col_block > 1;
    const s = g.stats;
    const chart = h("div", { class: "chart heatmap", id: `heatmap-${name}`, "data-name": name, role: "img", "aria-label": `Heatmap of the gradient of ${name}, shape ${shape(g.shape)}` });
    const card = h("figure", { class: "heatmap-card", "data-name": name },
      h("figcaption", {},
        h("b", {}, `${name}.g`), ` ${shape(g.shape)}`,
        h("span", { class: "stats" }, ` min ${num(s.min)} · max ${num(s.max)} · mean ${num(s.mean)} · ‖·‖ ${num(s.norm)}`)),
      down ? h("p", { class: "notice downsampled" },
        `Downsampled: true shape ${shape(g.shape)}; each cell is ${VIEWS[view].cell || "the mean"} of a ${hm.row_block} × ${hm.col_block} block (${hm.z.length} × ${hm.z[0].length} cells shown).`) : null,
      g.nonfinite ? h("p", { class: "notice bad" }, `${g.nonfinite} entries are not finite (NaN or ±inf); drawn as gaps.`) : null,
      chart);
    cards.push([card, chart, name, g, hm, oneD, rows, cols]);
  }
  container.replaceChildren(...cards.map((c) => c[0]));
  for (const [, chart, name, g, hm, oneD, rows, cols] of cards) {
    const { width, height } = chartSize(rows, cols, oneD);
    chart.closest("figure").style.width = `${width + 18}px`;
    const titles = axisTitles(g.shape);
    // Cell centres in the tensor's own index units, so hover and ticks give true positions.
    const xs = hm.z[0].map((_, j) => j * hm.col_block + (hm.col_block - 1) / 2);
    const ys = hm.z.map((_, i) => i * hm.row_block + (hm.row_block - 1) / 2);
    const blocky = hm.row_block > 1 || hm.col_block > 1;
    const blockWord = view === "difference" ? "largest |diff| in block" : "block mean";
    const zmax = Math.max(1e-30, ...hm.z.flat().filter((v) => v != null).map(Math.abs));
    const trace = view === "difference" && g.tolerance_heatmap ? toleranceTrace(hm, name, oneD, xs, ys, blocky) : {
      type: "heatmap", z: hm.z, x: xs, y: oneD ? [0] : ys,
      colorscale: DIVERGING, zmid: 0, zmin: -zmax, zmax,
      colorbar: { title: { text: VIEWS[view].title(name), side: "right" }, thickness: 12, len: 1, outlinewidth: 0, tickformat: ".3~g" },
      hoverongaps: false,
      hovertemplate: oneD
        ? `${name}.g[%{x}]${blocky ? ` (${blockWord})` : ""} = %{z:.4g}<extra></extra>`
        : `row %{y}, col %{x}${blocky ? ` (${blockWord})` : ""}<br>%{z:.4g}<extra></extra>`,
    };
    const layout = {
      width, height, margin: { l: oneD ? 20 : 64, r: 10, t: 8, b: 44 },
      xaxis: { title: { text: titles.x, font: { size: 11 } }, range: [-0.5, cols - 0.5], ...ticks(cols, width - (oneD ? 130 : 200)), tickfont: { size: 10 }, showgrid: false, zeroline: false },
      yaxis: oneD
        ? { visible: false }
        : { title: { text: titles.y, font: { size: 11 } }, range: [rows - 0.5, -0.5], ...ticks(rows, height - 60), tickfont: { size: 10 }, showgrid: false, zeroline: false },
      plot_bgcolor: "#e9ecef", paper_bgcolor: "#fff",
    };
    Plotly.newPlot(chart, [trace], layout, { displayModeBar: false, responsive: false });
    chart.dataset.view = view;
  }
}
