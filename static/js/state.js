// The whole config lives in the URL: query string <-> config object <-> form. So does what the
// page shows of it (the selected step, the heatmap view, presentation mode), so a link can
// point at a step. Field kinds and limits come from the server (RunRequest's schema), handed
// over once as JSON.

import { toJSON } from "./format.js";

export { toJSON }; // main.js's comparisons; it lives in format.js, so api.js needs no form

export const FIELDS = JSON.parse(document.getElementById("run-fields").textContent);
const DEFAULTS = Object.fromEntries(FIELDS.map((f) => [f.name, f.default]));

const INT = /^\s*-?\d+\s*$/;

/** Text from a URL or an input -> the value the API expects; unparsable text is sent as it is,
 * so that the server's 422 names the field. */
function parseValue(field, text) {
  const t = String(text).trim();
  switch (field.kind) {
    case "int":
      // beyond 2^53 a JS number would round: a BigInt, sent as a JSON number (api.js)
      if (!INT.test(t)) return t;
      return Number.isSafeInteger(Number(t)) ? Number(t) : BigInt(t);
    case "float":
      return t !== "" && Number.isFinite(Number(t)) ? Number(t) : t;
    case "bool":
      return t === "true" || t === "1" || t === "on" ? true : t === "false" || t === "0" || t === "" ? false : t;
    case "list":
    case "int_or_list": {
      if (field.kind === "list" && t === "") return [];
      const parts = t.replace(/^[([]|[)\]]$/g, "").split(",").map((s) => s.trim());
      if (parts[parts.length - 1] === "" && parts.length > 1) parts.pop(); // "50," is (50,)
      if (!parts.every((p) => INT.test(p))) return t;
      const sizes = parts.map(Number);
      return field.kind === "int_or_list" && sizes.length === 1 && !t.includes(",") ? sizes[0] : sizes;
    }
    default:
      return t;
  }
}

/** A value -> its text in the URL and in the form: lists as "4,3", [] as "". */
function formatValue(value) {
  return Array.isArray(value) ? value.join(",") : String(value);
}

const same = (a, b) => toJSON(a) === toJSON(b);

/** The config a query string asks for: only the fields it names (the server fills the rest). */
export function configFromQuery(search) {
  const params = new URLSearchParams(search);
  const config = {};
  for (const f of FIELDS) if (params.has(f.name)) config[f.name] = parseValue(f, params.get(f.name));
  return config;
}

// What the page shows, beside the config: `step` (gradient:step, e.g. "x:3"), `view`
// (manual, autograd, difference), `cells` (extreme, mean), `present` (1: presentation mode),
// `numbers` (0: hide the values of a small run's step), `follow` (x.g:3,100: the element
// followed back to its terms, static/js/follow.js), `recipe` (article: real data with the
// article's init and loss, asked for; see recipe.js).
const PAGE_PARAMS = ["step", "view", "cells", "present", "numbers", "follow", "recipe"];

/** The page state a query string asks for (strings; absent ones are left out). */
export function pageFromQuery(search) {
  const params = new URLSearchParams(search);
  return Object.fromEntries(PAGE_PARAMS.filter((k) => params.has(k)).map((k) => [k, params.get(k)]));
}

/** The query string for a config (the fields that differ from the defaults, commas kept),
 * then the page state (`page`: values that are null or "" are left out). */
export function queryFromConfig(config, page = {}) {
  const parts = [];
  for (const k of PAGE_PARAMS) {
    if (page[k] != null && page[k] !== "") parts.push(`${k}=${encodeURIComponent(page[k]).replace(/%3A/gi, ":").replace(/%2C/gi, ",")}`);
  }
  const tail = parts.splice(0);
  for (const f of FIELDS) {
    if (!(f.name in config) || same(config[f.name], DEFAULTS[f.name])) continue;
    const enc = encodeURIComponent(formatValue(config[f.name])).replace(/%2C/gi, ",");
    parts.push(`${f.name}=${enc}`);
  }
  parts.push(...tail);
  return parts.length ? `?${parts.join("&")}` : "";
}

/** The config the form shows, and the fields whose text the browser could not read. */
export function configFromForm(form) {
  const config = {};
  const unreadable = [];
  for (const f of FIELDS) {
    const input = form.elements[f.name];
    if (!input) continue;
    if (input.validity && input.validity.badInput) {
      unreadable.push(f.name);
      continue;
    }
    config[f.name] = f.kind === "bool" ? input.checked : parseValue(f, input.value);
  }
  return { config, unreadable };
}

/** Show a config in the form; fields it lacks show their defaults. */
export function configToForm(form, config) {
  for (const f of FIELDS) {
    const input = form.elements[f.name];
    if (!input) continue;
    const value = f.name in config ? config[f.name] : DEFAULTS[f.name];
    if (f.kind === "bool") input.checked = value === true;
    else input.value = formatValue(value);
  }
}
