// The program page's inputs as a form: one row per input, in the order they are made (the
// order draws the numbers), each row a kind (randn, zeros, ones, randint, a value, the names
// data) and only the fields that kind reads, each with its help. The JSON beside it is the
// same object; either one edits it (program.js keeps them in step).
import { h } from "./format.js";

const KINDS = {
  randn: "randn × scale + offset",
  zeros: "zeros (+ offset)",
  ones: "ones × scale + offset",
  randint: "randint: integers 0 … high−1",
  value: "a value",
  names: "names data (X or Y)",
};
const HELP = {
  name: "The name the forward reads (letters, digits, _)",
  kind: "How the input is made",
  shape: "The tensor's shape: sizes separated by commas, e.g. 32, 64",
  scale: "Multiplies the draw (randn, ones)",
  offset: "Added after the scale",
  high: "randint: values from 0 to high − 1",
  value: "A number (such as a batch size n) or a nested list, as JSON: [[1, 2], [3, 4]]",
  field: "X: each row's context of block_size characters; Y: the character that follows",
  block_size: "Characters of context per row",
  rows: "How many rows of the data set (in the seed's shuffled order)",
  grad: "Gets a gradient, checked against autograd: a parameter. Untick for data (a float tensor that is not learned). Integer inputs never have one.",
};

/** An input spec -> its kind. */
function kindOf(spec) {
  if (spec.data) return "names";
  if (spec.value !== undefined && spec.value !== null) return "value";
  return spec.init || "randn";
}

const parseShape = (text) => {
  const dims = String(text).split(/[\s,×()[\]]+/).filter(Boolean).map(Number);
  if (!dims.length || dims.some((d) => !Number.isInteger(d) || d < 1)) throw new Error("sizes are whole numbers ≥ 1, e.g. 32, 64");
  return dims;
};

/** One row's fields -> its spec (throws Error(message) with `field` set on a bad field). */
function toSpec(f) {
  const bad = (field, message) => Object.assign(new Error(message), { field });
  const kind = f.kind;
  if (kind === "names") return { data: "names", field: f.field || "X", block_size: Number(f.block_size) || 3, rows: Number(f.rows) || 32 };
  if (kind === "value") {
    let value;
    try {
      value = JSON.parse(f.value);
    } catch {
      throw bad("value", "not a number or a list of numbers yet");
    }
    return { value, ...(f.grad ? {} : { grad: false }) };
  }
  let shape;
  try {
    shape = parseShape(f.shape);
  } catch (e) {
    throw bad("shape", e.message);
  }
  const spec = { shape, init: kind };
  if (kind === "randint") return { ...spec, high: Number(f.high) || 2 };
  const num = (k, fallback) => (f[k] === "" || f[k] == null ? fallback : Number(f[k]));
  if (num("scale", 1) !== 1) spec.scale = num("scale", 1);
  if (num("offset", 0) !== 0) spec.offset = num("offset", 0);
  if (!f.grad) spec.grad = false;
  if (Number.isNaN(spec.scale ?? 0)) throw bad("scale", "a number");
  if (Number.isNaN(spec.offset ?? 0)) throw bad("offset", "a number");
  return spec;
}

/** A spec -> the fields its row shows. */
function fieldsOf(name, spec) {
  return {
    name, kind: kindOf(spec),
    shape: (spec.shape || []).join(", "), scale: spec.scale ?? 1, offset: spec.offset ?? 0, high: spec.high ?? 27,
    value: spec.value === undefined || spec.value === null ? "" : JSON.stringify(spec.value),
    field: spec.field || "X", block_size: spec.block_size ?? 3, rows: spec.rows ?? 32,
    grad: spec.grad !== false,
  };
}

const SHOWN = {
  randn: ["shape", "scale", "offset", "grad"], zeros: ["shape", "offset", "grad"], ones: ["shape", "scale", "offset", "grad"],
  randint: ["shape", "high"], value: ["value", "grad"], names: ["field", "block_size", "rows"],
};

export class InputsForm {
  /** el: the form's container; onChange(inputs): the form made a valid inputs object. */
  constructor(el, onChange) {
    Object.assign(this, { el, onChange });
    this.rows = []; // [{fields, tr}]
  }

  /** Show `inputs` (a preset, the JSON box): one row each, in their order. */
  set(inputs) {
    this.rows = Object.entries(inputs || {}).map(([name, spec]) => ({ fields: fieldsOf(name, spec) }));
    this.draw();
  }

  draw() {
    const head = h("tr", {}, ...["name", "kind", "shape", "scale", "offset", "high", "value", "field", "block_size", "rows", "grad", ""]
      .map((k) => h("th", { title: HELP[k] || "" }, k)));
    const body = this.rows.map((row, i) => this.rowEl(row, i));
    const add = h("button", { type: "button", class: "small secondary", id: "input-add", onclick: () => this.add() }, "+ add an input");
    this.el.replaceChildren(
      h("div", { class: "table-scroll" }, h("table", { class: "input-form", "aria-label": "Inputs, in the order they are made" }, h("thead", {}, head), h("tbody", {}, ...body))),
      add,
      h("span", { class: "note input-form-error", role: "alert", id: "input-form-error" }),
    );
  }

  rowEl(row, i) {
    const f = row.fields;
    const shown = new Set(SHOWN[f.kind]);
    const cell = (key, control) => h("td", { "data-key": key }, shown.has(key) || key === "name" || key === "kind" ? control : "");
    const input = (key, attrs = {}) => {
      const el = h("input", { name: key, value: String(f[key]), "aria-label": `${f.name} ${key}`, title: HELP[key], ...attrs });
      el.addEventListener("input", () => {
        f[key] = el.value;
        this.changed(row, key === "name" ? null : key);
      });
      return el;
    };
    const select = (key, options) => {
      const el = h("select", { name: key, "aria-label": `${f.name} ${key}`, title: HELP[key] },
        ...Object.entries(options).map(([v, label]) => h("option", { value: v, ...(v === f[key] ? { selected: "" } : {}) }, label)));
      el.addEventListener("change", () => {
        f[key] = el.value;
        if (key === "kind") this.kindChanged(row);
        else this.changed(row, key);
      });
      return el;
    };
    const grad = h("input", { type: "checkbox", name: "grad", "aria-label": `${f.name} has a gradient`, title: HELP.grad, ...(f.grad ? { checked: "" } : {}) });
    grad.addEventListener("change", () => ((f.grad = grad.checked), this.changed(row, "grad")));
    const tr = h("tr", { "data-name": f.name },
      cell("name", input("name", { size: 8, spellcheck: "false" })),
      cell("kind", select("kind", KINDS)),
      cell("shape", input("shape", { size: 9, placeholder: "32, 64" })),
      cell("scale", input("scale", { size: 5, inputmode: "decimal" })),
      cell("offset", input("offset", { size: 5, inputmode: "decimal" })),
      cell("high", input("high", { size: 4, inputmode: "numeric" })),
      cell("value", input("value", { size: 10, placeholder: "32 or [[1, 2]]" })),
      cell("field", select("field", { X: "X (contexts)", Y: "Y (next)" })),
      cell("block_size", input("block_size", { size: 3, inputmode: "numeric" })),
      cell("rows", input("rows", { size: 5, inputmode: "numeric" })),
      cell("grad", grad),
      h("td", {},
        h("button", { type: "button", class: "small secondary", title: "Make it one earlier (the order draws the numbers)", "aria-label": `move ${f.name} up`, disabled: i === 0 ? "" : null, onclick: () => this.move(i) }, "↑"),
        h("button", { type: "button", class: "small secondary", title: "Remove this input", "aria-label": `remove ${f.name}`, onclick: () => this.remove(i) }, "×")),
    );
    row.tr = tr;
    return tr;
  }

  kindChanged(row) {
    const f = row.fields;
    if (f.kind === "value" && f.value === "") f.value = "1";
    if (f.kind === "randint" || f.kind === "names") f.grad = false;
    if (f.kind !== "value" && f.shape === "") f.shape = "4";
    this.draw();
    this.changed(row, "kind");
  }

  add() {
    const taken = new Set(this.rows.map((r) => r.fields.name));
    let k = 1;
    while (taken.has(`x${k}`)) k++;
    this.rows.push({ fields: fieldsOf(`x${k}`, { shape: [4] }) });
    this.draw();
    this.emit();
  }

  move(i) {
    if (i < 1) return;
    [this.rows[i - 1], this.rows[i]] = [this.rows[i], this.rows[i - 1]];
    this.draw();
    this.emit();
  }

  remove(i) {
    this.rows.splice(i, 1);
    this.draw();
    this.emit();
  }

  changed(row) {
    row.tr.dataset.name = row.fields.name;
    this.emit();
  }

  /** The rows as an inputs object, when every row is valid (else the first problem, said). */
  emit() {
    const out = {};
    const error = this.el.querySelector(".input-form-error");
    for (const r of this.el.querySelectorAll("[aria-invalid]")) r.removeAttribute("aria-invalid");
    for (const { fields, tr } of this.rows) {
      let spec;
      if (!/^[A-Za-z][A-Za-z0-9_]*$/.test(fields.name)) return this.fail(error, tr, "name", `"${fields.name}" is not a name: letters, digits and _, starting with a letter`);
      if (Object.hasOwn(out, fields.name)) return this.fail(error, tr, "name", `${fields.name} is made twice`);
      try {
        spec = toSpec(fields);
      } catch (e) {
        return this.fail(error, tr, e.field, `${fields.name}: ${e.field} ${e.message}`);
      }
      out[fields.name] = spec;
    }
    error.textContent = "";
    this.onChange(out);
  }

  fail(error, tr, key, message) {
    tr.querySelector(`[name="${key}"]`)?.setAttribute("aria-invalid", "true");
    error.textContent = message;
  }
}
