// Which wrong gradient to fix first. A wrong formula makes every gradient computed from it
// wrong too, so learners "fix" correct lines. In execution order, a failing gradient whose
// formula reads no gradient already wrong is a cause; one that reads such a gradient is wrong
// because it uses it.

/** The check of one gradient (a leaf's, or an intermediate's such as l1.g), or null. */
function verdictOf(data, name) {
  const c = data.check;
  return c.tensors?.[name] ?? c.intermediates?.[name] ?? null;
}

const uses = (code, name) => new RegExp(`(^|[^\\w.])${name}\\.g\\b`).test(code);

/** Map of every failing gradient, in execution order -> null (a cause: fix this one) or the
 * name of the wrong gradient its formula uses. A hidden formula (an exercise, its code
 * redacted) is taken to use the first cause, when there is one. */
export function blame(data) {
  const wrong = new Map();
  for (const b of data.backward || []) {
    const c = verdictOf(data, b.grad);
    if (!c || c.allclose || wrong.has(b.grad)) continue;
    const body = String(b.code || "").replace(/^[^=]*=/, ""); // what it reads, not what it writes
    const via = [...wrong.keys()].find((n) => n !== b.grad && uses(body, n));
    const first = [...wrong.keys()][0];
    wrong.set(b.grad, via ?? (b.hidden && first ? first : null));
  }
  return wrong;
}

/** The root a gradient's error comes from (following "uses" back to a cause). */
function rootOf(wrong, name) {
  let n = name;
  for (let i = 0; i < 64 && wrong.get(n); i++) n = wrong.get(n);
  return n;
}

/** "first wrong: fix this one" or "wrong because it uses l1.g" (and where that comes from). */
export function blameText(wrong, name) {
  if (!wrong.has(name)) return "";
  const via = wrong.get(name);
  if (via == null) return [...wrong.keys()][0] === name ? "the first wrong gradient: fix this one" : "wrong at its own formula";
  const root = rootOf(wrong, name);
  return root !== via ? `wrong because it uses ${via}.g (wrong from ${root}.g)` : `wrong because it uses ${via}.g`;
}
