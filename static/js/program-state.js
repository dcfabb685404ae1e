// The program page's state in the URL, so that a link reproduces the program:
//   ?preset=<id>          the preset as it is (its texts and inputs);
//   ?p=<packed>           anything else: {forward, backward, inputs, loss, seed, dtype} as JSON,
//                         deflate-raw compressed (CompressionStream) and base64url-encoded;
//   &hide=<spec>          a teacher's exercise: backward lines taken out on load (gradient
//                         names such as dW1, W1 or W1.g, line numbers, ranges 12-15).
// A hidden block leaves one placeholder comment (`# TODO: write dW1`), so the page can tell
// that something is still to write.

const PLACEHOLDER = "# TODO: write";
const ASSIGN = /^\s*([A-Za-z_]\w*(?:\.g)?)\s*(?:\[.*\])?\s*(?:[-+*/]?=)(?!=)/;

/** The name a backward line assigns or writes into (`dW1`, `W1.g`, `dlogprobs` of
 * `dlogprobs[range(n), Yb] = ...`), or null. */
function assigned(line) {
  const m = ASSIGN.exec(line);
  return m ? m[1] : null;
}

/** Statements as blocks of lines: a top-level line and the indented lines under it (a loop). */
function blocks(lines) {
  const out = [];
  lines.forEach((line, i) => {
    const indented = /^\s/.test(line) && line.trim() !== "";
    if (indented && out.length) out[out.length - 1].end = i;
    else out.push({ start: i, end: i });
  });
  return out;
}

function parseSpec(spec) {
  const names = new Set();
  const numbers = new Set();
  for (const item of String(spec || "").split(/[\s,]+/).filter(Boolean)) {
    const range = /^(\d+)(?:-(\d+))?$/.exec(item);
    if (range) {
      const a = Number(range[1]);
      const b = Number(range[2] ?? range[1]);
      for (let k = Math.min(a, b); k <= Math.max(a, b) && k - a < 2000; k++) numbers.add(k);
    } else {
      const base = item.endsWith(".g") ? item.slice(0, -2) : item;
      names.add(base);
    }
  }
  return { names, numbers };
}

/** The backward with the lines `spec` names taken out, each hidden block replaced by one
 * placeholder line: {text, hidden: [the names those blocks wrote]}. A name matches the lines
 * that write its gradient however it is spelled (dW1, W1.g, or W1 for either). */
export function hideLines(text, spec) {
  const { names, numbers } = parseSpec(spec);
  if (!names.size && !numbers.size) return { text, hidden: [] };
  const lines = text.split("\n");
  const out = [];
  const hidden = [];
  for (const b of blocks(lines)) {
    const body = lines.slice(b.start, b.end + 1);
    const targets = body.map(assigned).filter(Boolean);
    const matches = (t) => names.has(t) || names.has(t.replace(/\.g$/, "")) || (t.startsWith("d") && names.has(t.slice(1)));
    const byName = targets.some(matches);
    const byLine = body.some((_, k) => numbers.has(b.start + k + 1));
    if (!byName && !byLine) {
      out.push(...body);
      continue;
    }
    const what = [...new Set(targets)];
    hidden.push(...what);
    const placeholder = `${PLACEHOLDER} ${what.join(", ") || "this line"}`;
    // consecutive hidden blocks of one name share one placeholder
    if (out.length && out[out.length - 1] === placeholder) continue;
    out.push(placeholder);
  }
  return { text: out.join("\n"), hidden: [...new Set(hidden)] };
}

/** Placeholder lines still in a text: what a teacher hid and the learner has not written. */
export function placeholders(text) {
  return text.split("\n").map((l, i) => [i + 1, l]).filter(([, l]) => l.trim().startsWith(PLACEHOLDER));
}

function b64url(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function unb64url(text) {
  const s = atob(text.replace(/-/g, "+").replace(/_/g, "/"));
  return Uint8Array.from(s, (c) => c.charCodeAt(0));
}

async function through(bytes, stream) {
  return new Uint8Array(await new Response(new Blob([bytes]).stream().pipeThrough(stream)).arrayBuffer());
}

/** A program as the `p=` value: deflate-raw JSON, base64url ("j" + plain base64url JSON where
 * the browser has no CompressionStream). */
async function pack(program) {
  const json = new TextEncoder().encode(JSON.stringify(program));
  if (typeof CompressionStream === "undefined") return `j${b64url(json)}`;
  return `z${b64url(await through(json, new CompressionStream("deflate-raw")))}`;
}

async function unpack(text) {
  const kind = text[0];
  const bytes = unb64url(text.slice(1));
  const json = kind === "z" ? await through(bytes, new DecompressionStream("deflate-raw")) : bytes;
  return JSON.parse(new TextDecoder().decode(json));
}

const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

/** The query string for a program: `?preset=id` while it is the preset unchanged. */
export async function queryFor(program, preset) {
  if (preset && same(program, preset.request)) return `?preset=${encodeURIComponent(preset.id)}`;
  return `?p=${await pack(program)}`;
}

/** {program, preset id, hide spec} from a query string (`presets`: GET /api/programs's list). */
export async function fromQuery(search, presets) {
  const q = new URLSearchParams(search);
  const hide = q.get("hide") || "";
  let program = null;
  let presetId = null;
  if (q.get("p")) {
    try {
      program = await unpack(q.get("p"));
    } catch {
      program = null;
    }
  }
  if (!program) {
    presetId = q.get("preset") || "makemore";
    const preset = presets.find((p) => p.id === presetId) || presets[0];
    presetId = preset.id;
    program = structuredClone(preset.request);
  }
  if (hide) program.backward = hideLines(program.backward, hide).text;
  return { program, presetId, hide };
}
