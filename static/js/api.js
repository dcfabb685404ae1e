// The API calls the page makes, and FastAPI's 422 detail sorted by the field it names.
import { toJSON } from "./format.js";

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

/**
 * Every request the pages make goes through here: a busy server's 503 with Retry-After is
 * waited out ("queued"), and an answer that is not ok throws ApiError with the body read.
 * `body`: sent as JSON (POST) when given; otherwise a GET. Gives the ok Response.
 */
async function request(url, { body, signal } = {}) {
  const init = body === undefined ? { signal } : {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: toJSON(body), // BigInt seeds as exact JSON numbers
    signal,
  };
  let res;
  for (let waited = 0; ; ) {
    res = await fetch(url, init);
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
  if (!res.ok) {
    let data = null;
    try {
      data = await res.json();
    } catch {
      data = null;
    }
    throw new ApiError(res.status, data, res.headers.get("Retry-After"));
  }
  return res;
}

async function postJSON(url, body, signal) {
  return (await request(url, { body, signal })).json();
}

/** A streamed answer (server-sent events): once the server has taken the request, an async
 * iterator of its {event, data}. */
async function stream(url, body, signal) {
  const res = await request(url, { body, signal });
  return events(res.body);
}

/** A file from the server, saved under the name the server gives it (Content-Disposition),
 * else `fallback`. Gives the name it was saved as. */
async function download(url, body, fallback, signal) {
  const res = await request(url, { body, signal });
  const name = filename(res.headers.get("content-disposition")) || fallback;
  save(await res.blob(), name);
  return name;
}

/** The file name of a Content-Disposition header (RFC 6266's filename*= first), or null. */
function filename(disposition) {
  const text = disposition || "";
  const star = /filename\*\s*=\s*(?:UTF-8|utf-8)''([^;]+)/.exec(text);
  if (star) {
    try {
      return decodeURIComponent(star[1].trim());
    } catch {
      /* fall through to the plain one */
    }
  }
  const plain = /filename\s*=\s*"?([^";]+)"?/.exec(text);
  return plain ? plain[1].trim() : null;
}

/** Hand a blob to the browser as a download (an object URL on a temporary link). */
function save(blob, name) {
  const url = URL.createObjectURL(blob);
  const link = Object.assign(document.createElement("a"), { href: url, download: name, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** A run for the page. `references`: autograd's heatmaps too (and the difference's), which
 * only the autograd and difference views draw: the manual view's run does without them
 * (the default run's answer 173 KB instead of 461 KB, ~6 ms less on the server). */
export const run = (config, signal, references = true) =>
  postJSON("/api/run", { ...config, reference_heatmaps: references }, signal);
/** One element followed back to its terms (`follow`: {grad, index} or {grad, block}), in the
 * run of `config` (the lab's formulas included): only the `follow` key is read, so nothing
 * else is asked for (one heatmap cell, no finite differences, no strategy comparison). */
export const followRun = (config, follow, signal) =>
  postJSON("/api/run", { ...config, follow, max_cells: 1, reference_heatmaps: false, fd_samples: 0, compare: false }, signal);
export const broadcast = (a, b, signal) => postJSON("/api/broadcast", { a, b }, signal);

/** The bug gallery (GET /api/bugs), for the lab's "Break it" menu. */
export async function bugs(signal) {
  return (await request("/api/bugs", { signal })).json();
}

/** POST /api/program: a program checked line by line. The page always asks for autograd's
 * heatmaps and the difference's too, for its three maps of the selected gradient. */
export const program = (body, signal) => postJSON("/api/program", { reference_heatmaps: true, ...body }, signal);
/** One element of a program's gradient followed back to its terms: only `follow` is read. */
export const followProgram = (body, follow, signal) =>
  postJSON("/api/program", { ...body, follow, reference_heatmaps: false }, signal);
/** POST /api/program/train and POST /api/train: training, streamed. */
export const trainProgram = (body, signal) => stream("/api/program/train", body, signal);
export const train = (config, signal) => stream("/api/train", config, signal);
/** POST /api/export: the run or program as a file. */
export const exportFile = (body, fallback) => download("/api/export", body, fallback);

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

/** errorsByField as one line for a banner: "field: message" (the field left out where the
 * message stands alone). */
export function errorText(err) {
  return Object.entries(errorsByField(err))
    .filter(([k]) => !k.startsWith("@"))
    .map(([k, m]) => (k ? `${k}: ${m.join("; ")}` : m.join("; ")))
    .join(" ");
}

/** Server-sent events from a fetch body: yields {event, data} as each one completes. */
async function* events(body) {
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
