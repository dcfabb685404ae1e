// The maths beside the code: for a linear layer's gradient formulas, the matrix form, one line
// of the chain rule, and (with strategy matmul or einsum) the code that actually ran in place of
// the broadcast formula. Read from the formula's own code, so nothing here re-derives a
// gradient: a formula this does not recognise gets no panel.

const NAME = String.raw`[A-Za-z_]\w*(?:\.g)?`;
const PATTERNS = [
  { // x.g = (out.g.unsqueeze(1) * w).sum(-1)
    re: new RegExp(String.raw`^(${NAME})\.g = \((${NAME})\.unsqueeze\(1\) \* (${NAME})\)\.sum\(-1\)$`),
    make: ([x, g, w]) => ({
      matrix: `${x}.g = ${g} @ ${w}.T`,
      chain: `∂loss/∂${x}[n,i] = Σₒ ∂loss/∂${base(g)}[n,o] · ${w}[i,o]`,
      ran: { matmul: `${x}.g = ${g} @ ${w}.T`, einsum: `${x}.g = torch.einsum("no,io->ni", ${g}, ${w})` },
    }),
  },
  { // w.g = (x.unsqueeze(-1) * out.g.unsqueeze(1)).sum(0)
    re: new RegExp(String.raw`^(${NAME})\.g = \((${NAME})\.unsqueeze\(-1\) \* (${NAME})\.unsqueeze\(1\)\)\.sum\((0|\(0(?:, \d+)*\))\)$`),
    make: ([w, x, g]) => ({
      matrix: `${w}.g = ${x}.T @ ${g}`,
      chain: `∂loss/∂${w}[i,o] = Σₙ ${x}[n,i] · ∂loss/∂${base(g)}[n,o]`,
      ran: { matmul: `${w}.g = ${x}.T @ ${g}`, einsum: `${w}.g = torch.einsum("ni,no->io", ${x}, ${g})` },
    }),
  },
  { // b.g = out.g.sum(0)
    re: new RegExp(String.raw`^(${NAME})\.g = (${NAME})\.sum\((0|\(0(?:, \d+)*\))\)$`),
    make: ([b, g]) => ({
      matrix: `${b}.g = 1ᵀ @ ${g}   (a sum over the rows)`,
      chain: `∂loss/∂${b}[o] = Σₙ ∂loss/∂${base(g)}[n,o] · 1`,
      ran: null,
    }),
  },
];
const base = (g) => g.replace(/\.g$/, "");

/** {matrix, chain, ran: {matmul, einsum} | null} for a linear formula's code, else null. */
export function mathsFor(code) {
  for (const p of PATTERNS) {
    const m = p.re.exec(code.trim());
    if (m) return p.make(m.slice(1));
  }
  return null;
}
