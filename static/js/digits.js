// Image data drawn as images: the batch's first digits with their labels, and a first layer's
// weights (or their gradient) as one small image per unit, each set tiled into one Plotly
// heatmap (a grid of tiles with a one-pixel gap), so 50 units draw as fast as one.
import { DIVERGING, INK } from "./colours.js";
import { h, num } from "./format.js";
import { loadPlotly, plotlyReady } from "./plotly-ready.js";

const GAP = 1;
const projector = () => document.body.classList.contains("present"); // 18 px text

/** Fields the data sets when the request leaves them out: image data fixes in_features, and
 * for cross_entropy out_features (10 digits). The form always holds a value for every field,
 * so these are not sent, and the server fills them in (its answer shows them in the form). */
export function dropDataOwned(config) {
  if (!config.data || config.data === "random") return config;
  delete config.in_features;
  if (config.loss === "cross_entropy") delete config.out_features;
  return config;
}

/** Flat images (n, h*w) -> one z matrix of `cols` tiles a row, null between tiles, and the
 * hover text of every cell (which tile, which pixel). */
function mosaic(images, [rows, cols], perRow, label, rowGap = GAP) {
  const n = images.length;
  const across = Math.min(n, perRow);
  const down = Math.ceil(n / across);
  const H = down * (rows + rowGap) - rowGap;
  const W = across * (cols + GAP) - GAP;
  const z = Array.from({ length: H }, () => new Array(W).fill(null));
  const text = Array.from({ length: H }, () => new Array(W).fill(""));
  images.forEach((img, k) => {
    const top = Math.floor(k / across) * (rows + rowGap);
    const left = (k % across) * (cols + GAP);
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) {
        z[top + r][left + c] = img[r * cols + c];
        text[top + r][left + c] = `${label(k)}, pixel (${r}, ${c})`;
      }
    }
  });
  return { z, text, across, down, H, W };
}

/** Tiles of weights: a diverging scale centred at zero, symmetric over all the tiles. */
export function drawUnitImages(el, images, shape, { title = "", perRow = 10, tile = 0 } = {}) {
  const m = mosaic(images, shape, perRow, (k) => `unit ${k}`);
  const zmax = Math.max(1e-30, ...images.flat().filter((v) => v != null).map(Math.abs));
  const px = tile || Math.max(3, Math.round(34 / shape[1]));  // screen pixels per image pixel
  Plotly.newPlot(el, [{
    type: "heatmap", z: m.z, text: m.text, colorscale: DIVERGING, zmid: 0, zmin: -zmax, zmax,
    hoverongaps: false, hovertemplate: "%{text}<br>%{z:.4g}<extra></extra>",
    colorbar: { thickness: 10, len: 1, outlinewidth: 0, tickformat: ".2~g", title: { text: title, side: "right", ...(projector() ? { font: { size: 18 } } : {}) }, ...(projector() ? { tickfont: { size: 18 } } : {}) },
  }], {
    width: m.W * px + 90, height: m.H * px + 16, margin: { l: 4, r: 4, t: 8, b: 8 },
    xaxis: { visible: false, range: [-0.5, m.W - 0.5] },
    yaxis: { visible: false, range: [m.H - 0.5, -0.5], scaleanchor: "x" },
    plot_bgcolor: "#fff", paper_bgcolor: "#fff",
  }, { displayModeBar: false, responsive: false });
}

/** The digits themselves: ink on white, each with its label above it. */
function drawDigits(el, view, count = 20) {
  const images = view.images.slice(0, count);
  const [rows, cols] = view.image_shape;
  const perRow = 10;
  const rowGap = Math.ceil(rows / 2);  // room for the labels above each row of tiles
  const m = mosaic(images, view.image_shape, perRow, (k) => `image ${k}: label ${view.labels[k]}`, rowGap);
  const px = Math.max(2, Math.round(30 / cols));
  const labelRow = 2;
  const annotations = images.map((_, k) => ({
    x: (k % m.across) * (cols + GAP) + (cols - 1) / 2,
    y: Math.floor(k / m.across) * (rows + rowGap) - 0.5,
    text: String(view.labels[k]), showarrow: false, yanchor: "bottom", font: { size: projector() ? 18 : 11, color: "#1864ab" },
  }));
  Plotly.newPlot(el, [{
    type: "heatmap", z: m.z, text: m.text, colorscale: INK, zmin: 0, zmax: Math.max(1, ...images.flat()),
    showscale: false, hoverongaps: false, hovertemplate: "%{text}<br>pixel value %{z}<extra></extra>",
  }], {
    width: m.W * px + 8, height: (m.H + rowGap) * px + 8,
    margin: { l: 4, r: 4, t: labelRow, b: 4 },
    xaxis: { visible: false, range: [-0.5, m.W - 0.5] },
    yaxis: { visible: false, range: [m.H - 0.5, -0.5 - rowGap] },
    annotations, plot_bgcolor: "#fff", paper_bgcolor: "#fff",
  }, { displayModeBar: false, responsive: false });
}

/** The run's image panel: shown with image data only. */
export function drawDataPanel(section, data) {
  const view = data.data;
  section.hidden = !view;
  section.pending = data; // the latest run: an older one never draws over it
  if (!window.Plotly) {
    if (view) (loadPlotly(), plotlyReady.then(() => section.pending === data && drawDataPanel(section, data)));
    return;
  }
  for (const el of section.querySelectorAll(".js-plotly-plot")) Plotly.purge(el);
  if (!view) return;
  const [rows, cols] = view.image_shape;
  const units = view.w1.length < view.units ? `the first ${view.w1.length} of ${view.units} units` : `${view.units} units`;
  section.querySelector("#data-caption").replaceChildren(
    h("b", {}, view.name), ` · x is the first ${data.tensors.x.shape.slice(0, -1).join(" × ")} images, ${rows} × ${cols} pixels each; `,
    `w1 ${data.tensors.w1.shape.join(" × ")} is ${units}, each a ${rows} × ${cols} image of what it looks at.`);
  drawDigits(section.querySelector("#data-digits"), view);
  const w1 = data.gradients.w1;
  drawUnitImages(section.querySelector("#data-w1"), view.w1, view.image_shape, { title: "w1" });
  drawUnitImages(section.querySelector("#data-w1g"), view.w1_grad, view.image_shape, { title: "w1.g" });
  section.querySelector("#data-w1g-stats").textContent = `w1.g: min ${num(w1.stats.min)} · max ${num(w1.stats.max)} · ‖·‖ ${num(w1.stats.norm)}`;
}
