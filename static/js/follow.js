// Follow one element: a click on a heatmap cell asks the server for the products that the
// gradient's formula sums into that element (POST /api/run with `follow`), and this panel shows
// them: the element and its value, the formula with the index filled in, each term with its
// factors' elements, the chart (follow-chart.js) and the sum arriving at the value. The
// diagram marks the slice of the broadcast product (diagram.js markFollow). The selection lives
// in the URL as `follow=x.g:3,100`, so a link or a reload opens the same element.
import { followRun } from "./api.js";
import { drawFollowChart } from "./follow-chart.js";
import { h, shape } from "./format.js";

const TERMS_LISTED = 8; // terms written out in words; the chart shows every one sent

/** "x.g:3,100" -> {grad: "x.g", index: [3, 100]}; anything else -> null. */
function parseFollow(text) {
  const m = /^([A-Za-z_]\w*\.g):(\d+(?:,\d+)*)$/.exec(String(text || "").trim());
  return m ? { grad: m[1], index: m[2].split(",").map(Number) } : null;
}

/** {grad, index} -> "x.g:3,100" (the URL's form). */
const formatFollow = (sel) => (sel && sel.index ? `${sel.grad}:${sel.index.join(",")}` : null);

/** A tensor's 2-D heatmap view (leading dims flattened) at (row, col) -> its own index. */
function viewIndex(dims, row, col) {
  if (dims.length <= 1) return [col];
  const idx = [];
  for (const n of dims.slice(0, -1).reverse()) (idx.unshift(row % n), (row = Math.floor(row / n)));
  return [...idx, col];
}

/** What to follow for a heatmap cell: its element, or for a downsampled map the block it
 * covers (the server follows the block's entry of largest magnitude, the one the cell shows). */
export function cellRequest(name, dims, hm, row, col) {
  const grad = `${name}.g`;
  if (hm.row_block === 1 && hm.col_block === 1) return { grad, index: viewIndex(dims, row, col) };
  const r0 = row * hm.row_block, c0 = col * hm.col_block;
  return { grad, block: { rows: [r0, Math.min(hm.rows, r0 + hm.row_block)], cols: [c0, Math.min(hm.cols, c0 + hm.col_block)] } };
}

const idx = (list) => `[${list.join(", ")}]`;
/** A factor's element for one term: its slice with the term's summed positions filled in. */
function factorRef(name, slice, positions) {
  let p = 0;
  return `${name}${idx(slice.map((i) => (i == null ? positions[p++] : i)))}`;
}
/** The term's positions on the summed dims (the nulls of `follow.slice`). */
const summedPositions = (follow, term) => term.index.filter((_, d) => follow.slice[d] == null);
/** Full precision, as the value is stored (float32: 8 digits tell it apart). */
const exact = (x) => (x == null ? "–" : Number(x.toPrecision(9)).toString());
const short = (x) => (x == null ? "–" : Number(x.toPrecision(4)).toString());

/** The diagram's line for a followed element: which slice of which product its ring marks. */
export function followNote(f) {
  const slice = idx(f.slice.map((s) => (s == null ? ":" : s)));
  return [h("span", { class: "follow-key", "aria-hidden": "true" }, "◌"), " ", h("code", {}, `${f.grad}${idx(f.index)}`),
    " sums the slice ", h("code", {}, slice), " of ", h("b", {}, shape(f.product_shape)),
    `: ${f.terms_total.toLocaleString("en")} products (ringed in ${f.grad}'s column).`];
}

export class FollowPanel {
  /** el: the panel; onChange(): the selection changed (the URL follows); onMark(follow|null):
   * mark the slice in the diagram. */
  constructor({ el, onChange, onMark }) {
    Object.assign(this, { el, onChange, onMark });
    this.selected = null; // {grad, index} or {grad, block}
    this.follow = null; // the server's answer for the current run
    this.controller = null;
    // drawn while hidden (presentation mode shows one section at a time) or resized: redraw
    // the chart at its new width
    this.width = 0;
    new ResizeObserver(() => {
      const w = this.el.clientWidth;
      if (w && Math.abs(w - this.width) > 20) (this.width = w), this.redraw();
    }).observe(el);
  }

  /** The URL's value: the followed element, once the server has said which it is. */
  get param() {
    return formatFollow(this.follow ? { grad: this.follow.grad, index: this.follow.index } : this.selected);
  }

  /** From the URL (null clears). */
  set(text) {
    this.fromBlock = null;
    this.selected = parseFollow(text);
    if (!this.selected) this.clear(false);
  }

  /** A heatmap cell was clicked (config: the run drawn, as sent). */
  pick(request, config) {
    this.fromBlock = request.block || null;
    this.selected = request;
    this.follow = null;
    this.scroll = true; // asked for by a click: shown once filled, not while empty
    this.load(config);
  }

  /** Bring the filled panel into view (its top below the sticky header: scroll-margin-top). */
  reveal() {
    if (!this.scroll) return;
    this.scroll = false;
    const top = this.el.getBoundingClientRect().top;
    if (top < 72 || top > window.innerHeight * 0.6) this.el.scrollIntoView({ block: "start" });
  }

  /** After a run is drawn: follow the selection in that run (its gradients may have changed). */
  async load(config) {
    if (!this.selected) return;
    this.controller?.abort();
    const mine = (this.controller = new AbortController());
    this.el.hidden = false;
    this.el.dataset.state = "loading";
    try {
      const data = await followRun(config, this.selected, mine.signal);
      if (this.controller !== mine) return;
      this.follow = data.follow;
      this.selected = { grad: data.follow.grad, index: data.follow.index };
      this.draw(data);
      this.reveal();
    } catch (err) {
      if (err.name === "AbortError" || this.controller !== mine) return;
      // an element the new config lacks (batch made smaller, a layer removed): say so, keep nothing
      const detail = err.body?.detail;
      const msg = Array.isArray(detail) ? detail.map((d) => d.msg).join("; ") : `The server answered ${err.status ?? err.message}.`;
      this.follow = null;
      this.selected = null;
      this.onMark(null);
      this.el.dataset.state = "error";
      this.el.replaceChildren(this.head("Cannot follow this element"), h("p", { class: "notice bad" }, msg));
      this.reveal();
    }
    this.onChange();
  }

  clear(notify = true) {
    this.controller?.abort();
    this.scroll = false;
    this.selected = this.follow = null;
    this.el.hidden = true;
    this.el.replaceChildren();
    delete this.el.dataset.state;
    this.onMark(null);
    if (notify) this.onChange();
  }

  head(title) {
    return h("div", { class: "follow-head" },
      h("h3", {}, title),
      h("button", { type: "button", class: "secondary follow-close", "aria-label": "Close the followed element", onclick: () => this.clear() }, "×"));
  }

  /** Redraw (presentation mode changes the chart's type size). */
  redraw() {
    if (this.follow && this.lastData) this.draw(this.lastData);
  }

  draw(data) {
    this.lastData = data;
    const f = data.follow;
    const ref = `${f.grad}${idx(f.index)}`;
    const total = f.terms_total;
    const shown = f.terms.length;
    const size = f.product_shape.reduce((a, b) => a * b, 1);
    const summedDims = f.slice.map((s, d) => (s == null ? d : null)).filter((d) => d != null);
    const sliceText = idx(f.slice.map((s) => (s == null ? ":" : s)));
    const diff = f.sum != null && f.value != null ? Math.abs(f.sum - f.value) : null;
    const eps = data.config.dtype === "float64" ? 2 ** -52 : 2 ** -23;
    const bound = f.abs_sum != null ? total * eps * f.abs_sum : null;
    const names = Object.keys(f.factor_index);
    const what = names.length > 1 ? "products" : "entries"; // a bias sums its gradient's entries

    const terms = f.terms.slice(0, TERMS_LISTED).map((t) => {
      const pos = summedPositions(f, t);
      const refs = names.map((n) => factorRef(n, f.factor_index[n], pos));
      const values = names.map((n) => short(t.factors[n]));
      return h("li", { "data-index": t.index.join(",") },
        h("code", {}, refs.join(" × ")),
        names.length > 1 ? ` = ${values.join(" × ")}` : "",
        " = ", h("b", {}, short(t.product)));
    });
    if (total > TERMS_LISTED) terms.push(h("li", { class: "more" }, `… ${(total - TERMS_LISTED).toLocaleString("en")} more${shown < total ? ` (${shown.toLocaleString("en")} sent, in the chart)` : ", in the chart"}`));

    this.el.dataset.state = "ready";
    this.el.dataset.grad = f.grad;
    this.el.dataset.index = f.index.join(",");
    this.el.dataset.terms = String(total);
    this.el.dataset.sum = String(f.sum);
    this.el.dataset.value = String(f.value);
    this.el.dataset.absSum = String(f.abs_sum);
    this.el.hidden = false;
    const chart = h("div", { class: "follow-chart", id: "follow-chart", role: "img", "aria-label": `The ${total} products summed into ${ref}, and their running sum` });
    this.el.replaceChildren(
      this.head(`Follow one element: ${ref}`),
      h("p", { class: "follow-element" },
        h("code", {}, ref), " = ", h("b", { class: "follow-value" }, exact(f.value)),
        this.fromBlock ? h("span", { class: "follow-block" }, ` (the largest |·| of the clicked cell's ${this.fromBlock.rows[1] - this.fromBlock.rows[0]} × ${this.fromBlock.cols[1] - this.fromBlock.cols[0]} block)`) : null,
        f.source === "user" ? h("span", { class: "badge" }, "your formula's value") : null),
      h("p", { class: "follow-formula" }, h("code", {}, f.formula)),
      h("p", { class: "follow-slice" },
        "The slice ", h("code", {}, sliceText), names.length > 1 ? " of the broadcast product " : ` of ${names[0]} `, h("b", {}, shape(f.product_shape)), ": ",
        h("b", {}, total.toLocaleString("en")), ` of its ${size.toLocaleString("en")} ${what}, summed over dim${summedDims.length > 1 ? "s" : ""} ${summedDims.join(", ")}.`),
      h("ol", { class: "follow-terms", start: "0" }, ...terms),
      chart,
      h("p", { class: "follow-sum" },
        `Σ of the ${total.toLocaleString("en")} ${what} = `, h("b", { class: "follow-total" }, exact(f.sum)),
        " → ", h("code", {}, ref), " = ", h("b", {}, exact(f.value)),
        diff != null ? h("span", { class: diff <= bound ? "ok" : "bad" },
          ` · difference ${short(diff)}${bound != null ? (diff <= bound ? `, rounding (≤ ${short(bound)})` : `, beyond rounding (${short(bound)})`) : ""}`) : null),
      // your formula in place: the terms are the built-in formula's; say so where they differ
      f.note ? h("p", { class: "follow-note bad" }, f.note) : "", // replaceChildren writes a null as "null"
    );
    drawFollowChart(chart, f, { ref, names, present: document.body.classList.contains("present") });
    this.onMark(f);
  }
}
