// One colour and one symbol per kind of backward step, shared by the diagram, its legend and
// the step-through's badges, so a step looks the same everywhere it appears.

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

export const GRAD_COLOUR = "#2f9e44";
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
