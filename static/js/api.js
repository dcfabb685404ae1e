// The API calls the page makes, and FastAPI's 422 detail sorted by the field it names.
import { toJSON } from "./state.js";

export class ApiError extends Error {
  constructor(status, body, retryAfter) {
    super(`HTTP ${status}`);
    this.status = status;
    this.body = body;
    this.retryAfter = retryAfter;
  }
}

// A busy server answers 503 with Retry-After: wait that long (plus up to a second, so a class
// that loaded at once does not come back at once) and ask again, showing "queued" meanwhile.
const MAX_QUEUED_S = 120;

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(signal.reason ?? new DOMException("Aborted", "AbortError"));
    }, { once: true });
  });
}

// The queued state: document.body.dataset.queued, and the loading line says so.
function showQueued(seconds) {
  const loading = document.getElementById("loading");
  const label = loading && [...loading.childNodes].find((n) => n.nodeType === Node.TEXT_NODE && n.textContent.trim());
  if (seconds === null) {
    delete document.body.dataset.queued;
    if (label && loading.dataset.label) label.textContent = loading.dataset.label;
    return;
  }
  document.body.dataset.queued = String(seconds);
  // the page's first run starts before the page's script shows its loading line: show it
  if (loading) loading.hidden = false;
  if (label) {
    loading.dataset.label ??= label.textContent;
    label.textContent = ` Queued: the server is busy; trying again in ${seconds} s…`;
  }
}

async function postJSON(url, body, signal) {
  let res;
  for (let waited = 0; ; ) {
    res = await fetch(url, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: toJSON(body), // BigInt seeds as exact JSON numbers
      signal,
    });
    const after = Number.parseInt(res.headers.get("Retry-After"), 10);
    if (res.status !== 503 || !(after >= 0) || waited + after > MAX_QUEUED_S) break;
    showQueued(after);
    try {
      await sleep((after + Math.random()) * 1000, signal);
    } finally {
      showQueued(null);
    }
    waited += after + 1;
  }
  let data = null;
  try {
    data = await res.json();
  } catch {
    data = null;
  }
  if (!res.ok) throw new ApiError(res.status, data, res.headers.get("Retry-After"));
  return data;
}

/** Fields a panel adds to every run (e.g. the formula lab's `formulas`), beside the form's. */
export const extras = {};

// The page always asks for autograd's heatmaps too, for the manual / autograd / difference switch.
export const run = (config, signal) => postJSON("/api/run", { ...config, ...extras, reference_heatmaps: true }, signal);
/** One element followed back to its terms (`follow`: {grad, index} or {grad, block}), in the
 * run of `config` (the lab's formulas included): only the `follow` key is read, so nothing
 * else is asked for (one heatmap cell, no finite differences, no strategy comparison). */
export const followRun = (config, follow, signal) =>
  postJSON("/api/run", { ...config, ...extras, follow, max_cells: 1, reference_heatmaps: false, fd_samples: 0, compare: false }, signal);
export const broadcast = (a, b, signal) => postJSON("/api/broadcast", { a, b }, signal);

/** The bug gallery (GET /api/bugs), for the lab's "Break it" menu. */
export async function bugs(signal) {
  const res = await fetch("/api/bugs", { signal });
  if (!res.ok) throw new ApiError(res.status, null, null);
  return res.json();
}

/**
 * Error messages keyed by the request field they name: detail loc ["body", field, ...rest]
 * goes under field (rest, e.g. a list index, prefixes the message); anything else under "".
 */
export function errorsByField(err) {
  const out = {};
  const add = (key, msg) => (out[key] ||= []).push(msg);
  if (!(err instanceof ApiError)) {
    add("", err.name === "TypeError" ? "The server could not be reached." : String(err.message || err));
    return out;
  }
  const detail = err.body && err.body.detail;
  if (Array.isArray(detail)) {
    for (const d of detail) {
      const loc = Array.isArray(d.loc) ? d.loc : [];
      const msg = String(d.msg || "invalid").replace(/^Value error, /, "");
      if (loc[0] === "body" && loc.length > 1) {
        const rest = loc.slice(2);
        add(String(loc[1]), rest.length ? `item ${rest.join(".")}: ${msg}` : msg);
        if (d.type === "memory_budget" || d.type === "work_limit") (out["@limits"] ||= []).push(msg);
      } else add("", msg);
    }
  } else if (typeof detail === "string") {
    add("", detail);
  } else if (err.status === 503) {
    add("", `The server is busy; try again${err.retryAfter ? ` in ${err.retryAfter} s` : ""}.`);
  } else if (err.status === 413) {
    add("", "The request is too large.");
  } else {
    add("", `The server answered ${err.status}.`);
  }
  return out;
}

/** Server-sent events from a fetch body: yields {event, data} as each one completes. */
export async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}
