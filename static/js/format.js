// Small formatters shared by every view: shapes as the article writes them, bytes, numbers.

/** [1000, 784, 50] -> "(1000, 784, 50)"; [50] -> "(50,)"; [] -> "()" (Python's tuple repr). */
export function shape(dims) {
  if (!Array.isArray(dims)) return String(dims);
  return dims.length === 1 ? `(${dims[0]},)` : `(${dims.join(", ")})`;
}

/** Decimal units, as memory is quoted in the article: 156800000 -> "156.8 MB". */
export function bytes(n) {
  if (n == null) return "–";
  const units = [["GB", 1e9], ["MB", 1e6], ["kB", 1e3]];
  for (const [unit, size] of units) {
    if (n >= size) return `${(n / size).toFixed(1)} ${unit}`;
  }
  return `${n} B`;
}

/** A number for a table: 3 significant digits, exponent form when small or large. */
export function num(x, digits = 3) {
  if (x == null) return "–";
  if (x === 0) return "0";
  const a = Math.abs(x);
  return a < 1e-3 || a >= 1e5 ? x.toExponential(digits - 1) : Number(x.toPrecision(digits)).toString();
}

/** Escape text for innerHTML. */
export function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

/** A DOM element from a tag, attributes and children (strings become text). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c != null) el.append(c instanceof Node ? c : String(c));
  return el;
}

/** JSON text of a value, BigInts as exact JSON numbers (seeds beyond 2^53). */
export function toJSON(value) {
  const marked = JSON.stringify(value, (_, v) => (typeof v === "bigint" ? `\u0000big${v}` : v));
  return marked === undefined ? "undefined" : marked.replace(/"\\u0000big(-?\d+)"/g, "$1");
}
