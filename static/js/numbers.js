// See the numbers: for a small run (the server sends every tensor's values when each has at
// most 64 entries), the selected step's operands and result as small tables. A broadcast step
// shows each operand stretched to the result's shape (the repeated entries tinted), so the
// following reduction can be seen summing the stretched dim away. The step's expression is
// evaluated here by a tiny interpreter over names, .g, .unsqueeze, .squeeze, .sum, .T, .pow,
// and the binary operators with broadcasting; a step it cannot read shows no numbers.
import { h, num, shape } from "./format.js";

/** A dense tensor: shape and row-major data. */
class T {
  constructor(shp, data) {
    this.shape = shp;
    this.data = data;
  }
  static from(nested) {
    const shp = [];
    for (let v = nested; Array.isArray(v); v = v[0]) shp.push(v.length);
    return new T(shp, [nested].flat(Infinity));
  }
  get size() {
    return this.shape.reduce((a, b) => a * b, 1);
  }
  strides(shp = this.shape) {
    const s = Array(shp.length).fill(1);
    for (let i = shp.length - 2; i >= 0; i--) s[i] = s[i + 1] * shp[i + 1];
    return s;
  }
  reshape(shp) {
    return new T(shp, this.data);
  }
  /** Broadcast to `shp` (right-aligned); `stretched`: per result entry, was it repeated? */
  expand(shp) {
    const lead = shp.length - this.shape.length;
    const own = this.strides();
    const out = [];
    const stretched = [];
    const n = shp.reduce((a, b) => a * b, 1);
    const rs = this.strides(shp);
    for (let k = 0; k < n; k++) {
      let src = 0;
      let rep = false;
      for (let d = 0; d < shp.length; d++) {
        const idx = Math.floor(k / rs[d]) % shp[d];
        const od = d - lead;
        if (od < 0) rep ||= idx > 0;
        else if (this.shape[od] === 1) rep ||= idx > 0;
        else src += idx * own[od];
      }
      out.push(this.data[src]);
      stretched.push(rep);
    }
    const t = new T(shp, out);
    t.stretched = stretched;
    return t;
  }
  sum(dims, keep = false) {
    const nd = this.shape.length;
    const ds = dims.map((d) => (d < 0 ? d + nd : d));
    const outShape = this.shape.map((s, i) => (ds.includes(i) ? 1 : s));
    const os = this.strides(outShape);
    const is = this.strides();
    const out = Array(outShape.reduce((a, b) => a * b, 1)).fill(0);
    for (let k = 0; k < this.size; k++) {
      let o = 0;
      for (let d = 0; d < nd; d++) if (!ds.includes(d)) o += (Math.floor(k / is[d]) % this.shape[d]) * os[d];
      out[o] += this.data[k];
    }
    return new T(keep ? outShape : this.shape.filter((_, i) => !ds.includes(i)), out);
  }
  transpose() {
    const [r, c] = this.shape;
    const out = [];
    for (let j = 0; j < c; j++) for (let i = 0; i < r; i++) out.push(this.data[i * c + j]);
    return new T([c, r], out);
  }
}

function broadcastShape(a, b) {
  const n = Math.max(a.length, b.length);
  const out = [];
  for (let i = 0; i < n; i++) {
    const x = a[a.length - n + i] ?? 1, y = b[b.length - n + i] ?? 1;
    if (x !== y && x !== 1 && y !== 1) throw new Error("shapes do not broadcast");
    out.push(Math.max(x, y));
  }
  return out;
}

function binary(a, b, op) {
  if (op === "@") {
    if (a.shape.length !== 2 || b.shape.length !== 2) throw new Error("matmul: 2-D only");
    const [n, k] = a.shape, m = b.shape[1];
    const out = [];
    for (let i = 0; i < n; i++) for (let j = 0; j < m; j++) {
      let s = 0;
      for (let t = 0; t < k; t++) s += a.data[i * k + t] * b.data[t * m + j];
      out.push(s);
    }
    return new T([n, m], out);
  }
  const shp = broadcastShape(a.shape, b.shape);
  const x = a.expand(shp), y = b.expand(shp);
  const f = { "*": (p, q) => p * q, "+": (p, q) => p + q, "-": (p, q) => p - q, "/": (p, q) => p / q }[op];
  return new T(shp, x.data.map((v, i) => f(v, y.data[i])));
}

/** Evaluates a step's expression against the run's values (tensors, and gradients as `.g`). */
function evaluate(expr, values) {
  const toks = expr.match(/\d+\.\d+|\d+|[A-Za-z_]\w*|\.|\(|\)|,|=|\*\*|[-+*/@]/g) || [];
  let i = 0;
  const peek = () => toks[i];
  const eat = (t) => {
    if (toks[i] !== t) throw new Error(`expected ${t}`);
    i++;
  };
  const scalar = (v) => new T([], [v]);
  function expr0() {
    let v = term();
    while (peek() === "+" || peek() === "-") {
      const op = toks[i++];
      v = binary(v, term(), op);
    }
    return v;
  }
  function term() {
    let v = unary();
    while (["*", "/", "@"].includes(peek())) {
      const op = toks[i++];
      v = binary(v, unary(), op);
    }
    return v;
  }
  function unary() {
    if (peek() === "-") return (i++, binary(scalar(-1), unary(), "*"));
    return postfix();
  }
  function args() {
    eat("(");
    const out = [];
    while (peek() !== ")") {
      if (/^[A-Za-z_]/.test(peek()) && toks[i + 1] === "=") {
        const k = toks[i];
        i += 2;
        out[k] = toks[i++];
      } else if (peek() === "(") {
        i++;
        const tup = [];
        while (peek() !== ")") {
          if (peek() === ",") i++;
          else tup.push(intTok());
        }
        i++;
        out.push(tup);
      } else out.push(intTok());
      if (peek() === ",") i++;
    }
    eat(")");
    return out;
  }
  function intTok() {
    let sign = 1;
    if (peek() === "-") (sign = -1), i++;
    return sign * Number(toks[i++]);
  }
  function postfix() {
    let v = primary();
    while (peek() === ".") {
      i++;
      const name = toks[i++];
      if (name === "g" && v.name) {
        if (!(v.name in values.grads)) throw new Error(`no gradient ${v.name}`);
        v = T.from(values.grads[v.name]);
        continue;
      }
      if (name === "T") {
        v = v.transpose();
        continue;
      }
      const a = args();
      if (name === "unsqueeze") {
        const d = a[0] < 0 ? a[0] + v.shape.length + 1 : a[0];
        v = v.reshape([...v.shape.slice(0, d), 1, ...v.shape.slice(d)]);
      } else if (name === "squeeze") {
        const d = a[0] < 0 ? a[0] + v.shape.length : a[0];
        v = v.reshape(v.shape.filter((_, k) => k !== d || v.shape[k] !== 1));
      } else if (name === "sum") {
        const dims = Array.isArray(a[0]) ? a[0] : [a[0]];
        v = v.sum(dims, a.keepdim === "True");
      } else if (name === "pow") {
        v = new T(v.shape, v.data.map((x) => x ** a[0]));
      } else throw new Error(`no ${name}`);
    }
    return v;
  }
  function primary() {
    const t = toks[i++];
    if (t === "(") {
      const v = expr0();
      eat(")");
      return v;
    }
    if (/^\d/.test(t)) return scalar(Number(t));
    if (t in values.tensors || t in values.grads) {
      const v = t in values.tensors ? T.from(values.tensors[t]) : new T([], [NaN]);
      v.name = t;
      return v;
    }
    throw new Error(`unknown name ${t}`);
  }
  const v = expr0();
  if (i !== toks.length) throw new Error("trailing input");
  return v;
}

/** A tensor as tables: 0-2 dims as one table, 3 dims as one table per leading index.
 * `marks`: per entry, a class (e.g. "stretched") or null; `sumDims`: dims to be summed away. */
function tensorTables(t, title, { marks = null, sumDims = [] } = {}) {
  const shp = t.shape.length === 0 ? [1, 1] : t.shape.length === 1 ? [1, t.shape[0]] : t.shape;
  const slices = shp.length === 2 ? [[]] : [...Array(shp[0]).keys()].map((k) => [k]);
  const [r, c] = shp.slice(-2);
  const per = r * c;
  const tables = slices.map((lead, s) =>
    h("table", { class: "nums" },
      lead.length ? h("caption", { class: sumDims.includes(0) ? "summed" : "" }, `[${lead[0]}, :, :]`) : null,
      h("tbody", {}, ...[...Array(r).keys()].map((i) =>
        h("tr", { class: sumDims.includes(shp.length - 2) && shp.length > 1 ? "sum-r" : "" }, ...[...Array(c).keys()].map((j) => {
          const k = s * per + i * c + j;
          return h("td", { class: marks && marks[k] ? marks[k] : "" }, num(t.data[k], 3));
        }))))));
  return h("figure", { class: "nums-block" },
    h("figcaption", {}, h("code", {}, title), ` ${shape(t.shape)}`),
    h("div", { class: "nums-slices" }, ...tables));
}

/** The numbers of a step (operands, stretched operands, result), or [] when not small. */
export function stepNumbers(data, p) {
  const values = data.values;
  const st = p.step;
  if (!values) return [];
  try {
    const result = evaluate(st.expr, values);
    const out = [h("h3", { class: "nums-head" }, "The numbers")];
    const ops = operands(st.expr);
    if (st.broadcast && ops) {
      for (const expr of ops) {
        const v = evaluate(expr, values);
        const big = v.expand(st.output);
        out.push(h("div", { class: "nums-row" },
          tensorTables(v, expr),
          h("span", { class: "nums-arrow" }, "stretched →"),
          tensorTables(big, `${expr}  (as ${shape(st.output)})`, { marks: big.stretched.map((r) => (r ? "stretched" : null)) })));
      }
      out.push(tensorTables(result, "result"));
    } else if (st.reduced_dims) {
      const inner = st.expr.replace(/\.(sum|mean)\([^()]*\)$/, "");
      const before = evaluate(inner, values);
      out.push(h("div", { class: "nums-row" },
        tensorTables(before, inner, { sumDims: st.reduced_dims }),
        h("span", { class: "nums-arrow" }, `Σ over dim ${st.reduced_dims.join(", ")} →`),
        tensorTables(result, "result")));
    } else {
      out.push(tensorTables(result, st.expr));
    }
    return out;
  } catch {
    return [h("p", { class: "note" }, "The numbers of this step are not shown (an expression this view does not evaluate).")];
  }
}

/** The two operands of a binary expression at its top level: "a.unsqueeze(1) * w" -> ["a.unsqueeze(1)", "w"]. */
export function operands(expr) {
  let depth = 0;
  let at = -1;
  for (let i = 0; i < expr.length; i++) {
    const c = expr[i];
    if (c === "(") depth++;
    else if (c === ")") depth--;
    else if (depth === 0 && "*+-/@".includes(c) && expr[i - 1] === " " && expr[i + 1] === " ") at = i;
  }
  if (at < 0) return null;
  const strip = (s) => s.trim().replace(/^\((.*)\)$/, "$1");
  return [strip(expr.slice(0, at)), strip(expr.slice(at + 1))];
}
