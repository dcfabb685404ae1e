// Every colour the pages draw with, in one place: one colour and one symbol per kind of
// backward step (the diagram, its legend, the step-through's badges), the tensors' roles, the
// heatmaps' scales (values, |difference| ÷ tolerance, pixels) and the training curves'. A
// value, a difference or a step looks the same on the main page, the program page and in
// the notebook widget.

// Shape-only steps share one colour (they move no numbers); the rest each have their own.
const ACTIONS = {
  reshape: { key: "reshape", label: "unsqueeze / squeeze / reshape", colour: "#6c8ebf", symbol: "circle" },
  broadcast: { key: "broadcast", label: "broadcast (size = memory)", colour: "#d9480f", symbol: "diamond" },
  reduce: { key: "reduce", label: "reduce (sum)", colour: "#7048e8", symbol: "triangle" },
  elementwise: { key: "elementwise", label: "elementwise", colour: "#0b7285", symbol: "circle" },
  scale: { key: "scale", label: "scale", colour: "#2b8a3e", symbol: "circle" },
  mask: { key: "mask", label: "mask", colour: "#a61e4d", symbol: "circle" },
  matmul: { key: "matmul", label: "matmul", colour: "#1864ab", symbol: "circle" },
  index: { key: "index", label: "index / gather", colour: "#8c6d31", symbol: "circle" },
};
const ALIASES = { unsqueeze: "reshape", squeeze: "reshape", view: "reshape", expand: "broadcast", sum: "reduce", gather: "index" };
const OTHER_COLOURS = ["#5c940d", "#862e9c", "#e67700", "#495057"];

export const ROLE_COLOURS = { param: "#868e96", target: "#868e96", input: "#343a40", activation: "#343a40", output: "#343a40" };

/** The legend key of a step: broadcast steps (with a `broadcast` rule) by that, else their action. */
export function actionKey(step) {
  if (step.broadcast) return "broadcast";
  const a = ALIASES[step.action] || step.action;
  return a;
}

function entry(key) {
  if (key in ACTIONS) return ACTIONS[key];
  let hash = 0;
  for (const c of key) hash = (hash * 31 + c.charCodeAt(0)) >>> 0;
  return { key, label: key, colour: OTHER_COLOURS[hash % OTHER_COLOURS.length], symbol: "circle" };
}

export const actionColour = (key) => entry(key).colour;
export const actionSymbol = (key) => entry(key).symbol;
export const actionLabel = (key) => entry(key).label;

// ---------------------------------------------------------------------------- heatmap scales

/** A tensor's values: blue for negative, white at zero, red for positive (zmid 0, symmetric). */
export const DIVERGING = [
  [0, "#2166ac"], [0.25, "#67a9cf"], [0.45, "#d1e5f0"], [0.5, "#f7f7f7"],
  [0.55, "#fddbc7"], [0.75, "#ef8a62"], [1, "#b2182b"],
];
/** Pixels: white paper, black ink. */
export const INK = [[0, "#ffffff"], [1, "#111111"]];
/** |difference| ÷ tolerance is drawn on [0, at least TOL_RANGE]. */
const TOL_RANGE = 3;

/** The one scale of |manual − autograd| ÷ tolerance (`ratios`, cells >= 0 or null), on every
 * page: up to 1 as it is, pale grey (within the tolerance: it passes); above 1 as
 * 1 + log10, red and deeper by the decade (a wrong formula lights up, rounding noise never
 * saturates). Returns the cells to draw (`z`) and the heatmap's colour fields, the raw
 * ratios as `customdata` for the hover. */
export function toleranceScale(ratios) {
  const z = ratios.map((row) => row.map((r) => (r == null ? null : r <= 1 ? r : 1 + Math.log10(r))));
  const top = Math.max(TOL_RANGE, ...z.flat().filter((v) => v != null));
  const edge = 1 / top;
  const tickvals = [0, 0.5, 1];
  for (let v = 2; v <= top; v += Math.max(1, Math.ceil((top - 1) / 5))) tickvals.push(v);
  return {
    z,
    colour: {
      customdata: ratios, zmin: 0, zmax: top,
      colorscale: [[0, "#f8f9fa"], [edge, "#ced4da"], [Math.min(1, edge + 1e-6), "#fcbba1"], [Math.min(1, edge + (1 - edge) / 3), "#fb6a4a"], [1, "#99000d"]],
      colorbar: { tickvals, ticktext: tickvals.map((v) => (v <= 1 ? String(v) : `1e${v - 1}`)) },
    },
  };
}

/** One colour per training run drawn on the same curves (cycled). */
export const SERIES = ["#1c7ed6", "#e8590c", "#2f9e44", "#ae3ec9", "#f59f00", "#0c8599"];
