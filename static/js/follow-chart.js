// The followed element's chart (Plotly): each factor's values, their products as bars, and the
// running sum of the products arriving at the element's value (a dashed line), one row each,
// sharing the term axis. In presentation mode every label is at least 18 px.
import { shape } from "./format.js";
import { loadPlotly, plotlyReady } from "./plotly-ready.js";

const COLOURS = ["#1864ab", "#2b8a3e", "#d9480f"]; // factors; products in the sum's purple
const SUM = "#7048e8";

/** The x axis: the term's position on the summed dim (k, or n), or its number when it runs
 * over several dims (a flattened *B). */
function termAxis(follow) {
  const summed = follow.slice.map((s, d) => (s == null ? d : null)).filter((d) => d != null);
  if (summed.length === 1) {
    const d = summed[0];
    return { x: follow.terms.map((t) => t.index[d]), title: `position on dim ${d} of ${shape(follow.product_shape)}` };
  }
  return { x: follow.terms.map((_, i) => i), title: `term (dims ${summed.join(", ")} flattened)` };
}

/** Plotly's data and layout. */
function followSpec(follow, { ref, names, present = false, width = 640 }) {
  const font = present ? 18 : 12;
  const { x, title } = termAxis(follow);
  const products = follow.terms.map((t) => t.product);
  const running = [];
  let acc = 0;
  for (const p of products) running.push((acc += p ?? 0));
  const rows = [...names.map((n) => ({ name: `${n}[…]`, y: follow.terms.map((t) => t.factors[n]), kind: "factor" })),
    ...(names.length > 1 ? [{ name: "product", y: products, kind: "product" }] : []),
    { name: "running sum", y: running, kind: "sum" }];
  const gap = present ? 0.07 : 0.06;
  const height = (present ? 150 : 95) * rows.length + 70;
  const each = (1 - gap * (rows.length - 1)) / rows.length;
  const data = [];
  const layout = {
    width, height, showlegend: false, bargap: 0.15,
    margin: { l: present ? 120 : 78, r: 12, t: 8, b: present ? 64 : 44 },
    font: { size: font }, plot_bgcolor: "#fff", paper_bgcolor: "#fff",
    annotations: [],
  };
  rows.forEach((row, i) => {
    const axis = i === 0 ? "" : String(i + 1);
    const top = 1 - i * (each + gap);
    const yaxis = { domain: [top - each, top], title: { text: row.name, font: { size: font } }, tickfont: { size: font }, zeroline: true, zerolinecolor: "#adb5bd", automargin: true, nticks: 4 };
    layout[`yaxis${axis}`] = yaxis;
    layout[`xaxis${axis}`] = {
      anchor: `y${axis}`, matches: i ? "x" : undefined, showticklabels: i === rows.length - 1, tickfont: { size: font },
      title: i === rows.length - 1 ? { text: title, font: { size: font } } : undefined,
    };
    const common = { x, y: row.y, xaxis: `x${axis}`, yaxis: `y${axis}`, name: row.name, hovertemplate: `%{x}: %{y:.5g}<extra>${row.name}</extra>` };
    if (row.kind === "sum") {
      data.push({ ...common, type: "scatter", mode: x.length > 200 ? "lines" : "lines+markers", line: { color: SUM, width: 2 }, marker: { size: 4 } });
      if (follow.value != null) {
        data.push({ x: [x[0], x[x.length - 1]], y: [follow.value, follow.value], xaxis: `x${axis}`, yaxis: `y${axis}`, type: "scatter", mode: "lines", line: { color: "#212529", dash: "dash", width: 1.5 }, hoverinfo: "skip" });
        const cut = follow.terms.length < follow.terms_total;
        layout.annotations.push({
          // above the row, at its right: never over the line it explains
          xref: "paper", yref: `y${axis} domain`, x: 1, y: 1, xanchor: "right", yanchor: "bottom",
          text: `dashed: ${ref} = ${follow.value.toPrecision(6)}${cut ? ` (the first ${follow.terms.length} of ${follow.terms_total} terms shown)` : ""}`,
          showarrow: false, font: { size: font, color: "#212529" }, bgcolor: "rgba(255,255,255,.85)",
        });
      }
    } else {
      data.push({ ...common, type: "bar", marker: { color: row.kind === "product" ? SUM : COLOURS[i % COLOURS.length] } });
    }
  });
  return { data, layout };
}

/** Draw into `el` once Plotly is there (it loads after the first picture). */
export function drawFollowChart(el, follow, opts) {
  const draw = () => {
    const width = Math.max(280, Math.min(opts.present ? 1400 : 900, el.clientWidth || 640));
    const { data, layout } = followSpec(follow, { ...opts, width });
    Plotly.react(el, data, layout, { displayModeBar: false, responsive: false });
    el.dataset.drawn = "1";
  };
  if (window.Plotly) return draw();
  loadPlotly();
  plotlyReady.then(draw);
}
