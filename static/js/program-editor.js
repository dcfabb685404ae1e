// A code pane: a plain <textarea> (no editor library) with a line-number gutter and line
// marks (a band behind the line and a coloured number: the first failing gradient's lines,
// a line that cannot run, the selected name's lines). Lines never wrap, so a textarea line is
// a program line; the pane grows with its text, so the gutter never scrolls apart from it.
import { h } from "./format.js";

const LINE_PX = 18; // the line height, in px (program.css sets it; presentation mode, more)
const PAD_PX = 6; // the textarea's top padding

export class CodeEditor {
  /** `root`: an empty element; `onInput(text)`: called on every edit. */
  constructor(root, { label, onInput }) {
    this.gutter = h("div", { class: "gutter", "aria-hidden": "true" });
    this.bands = h("div", { class: "bands", "aria-hidden": "true" });
    // Tab indents, as in a notebook; Escape then Tab leaves the pane (the editors' convention)
    this.area = h("textarea", { spellcheck: "false", autocapitalize: "off", autocomplete: "off", wrap: "off",
      "aria-label": `${label} (Tab indents; press Escape, then Tab, to move on)` });
    this.escaped = false;
    root.append(h("div", { class: "code-wrap" }, this.gutter, h("div", { class: "code-area" }, this.bands, this.area)));
    this.marks = {};
    this.lines = 0;
    this.area.addEventListener("input", () => (this.layout(), onInput(this.area.value)));
    this.area.addEventListener("scroll", () => (this.bands.style.transform = `translateX(${-this.area.scrollLeft}px)`));
    this.area.addEventListener("keydown", (ev) => this.key(ev));
    this.area.addEventListener("blur", () => (this.escaped = false));
  }

  get value() {
    return this.area.value;
  }

  set value(text) {
    this.area.value = text;
    this.layout();
  }

  /** Tab indents by four spaces; Enter keeps the line's indentation (and adds a level after
   * a `for ...:` line), as a notebook cell does. Escape, then Tab, leaves the pane. */
  key(ev) {
    const a = this.area;
    const escaped = this.escaped;
    this.escaped = ev.key === "Escape";
    if (ev.key === "Escape") a.closest(".editor")?.setAttribute("data-escaped", "1");
    else a.closest(".editor")?.removeAttribute("data-escaped");
    if (ev.key === "Tab" && escaped) return; // the browser moves the focus on
    if (ev.key === "Tab" && !ev.shiftKey && !ev.ctrlKey && !ev.metaKey && !ev.altKey) {
      ev.preventDefault();
      a.setRangeText("    ", a.selectionStart, a.selectionEnd, "end");
      a.dispatchEvent(new Event("input"));
    } else if (ev.key === "Enter" && !ev.shiftKey && !ev.ctrlKey && !ev.metaKey && !ev.altKey) {
      const before = a.value.slice(0, a.selectionStart);
      const line = before.slice(before.lastIndexOf("\n") + 1);
      let indent = /^\s*/.exec(line)[0];
      if (/:\s*$/.test(line)) indent += "    ";
      if (!indent) return;
      ev.preventDefault();
      a.setRangeText(`\n${indent}`, a.selectionStart, a.selectionEnd, "end");
      a.dispatchEvent(new Event("input"));
    }
  }

  /** Height, gutter numbers and marks for the current text. */
  /** The line height the stylesheet gives (18 px; larger in presentation mode). */
  get linePx() {
    return Number.parseFloat(getComputedStyle(this.area).lineHeight) || LINE_PX;
  }

  layout() {
    const n = Math.max(1, this.area.value.split("\n").length);
    this.area.style.height = `${(n + 1) * this.linePx + 2 * PAD_PX}px`;
    if (n !== this.lines) {
      this.lines = n;
      this.gutter.replaceChildren(...Array.from({ length: n }, (_, i) => h("div", { class: "ln", "data-line": i + 1 }, String(i + 1))));
    }
    this.paint();
  }

  /** `marks`: {line: {cls: "bad" | "err" | "sel" | "hidden", title}}; replaces the last ones. */
  mark(marks) {
    this.marks = marks;
    this.paint();
  }

  paint() {
    for (const el of this.gutter.children) {
      const m = this.marks[el.dataset.line];
      el.className = m ? `ln ${m.cls}` : "ln";
      if (m?.title) el.title = m.title;
      else el.removeAttribute("title");
    }
    this.bands.replaceChildren(...Object.entries(this.marks).filter(([line]) => line <= this.lines).map(([line, m]) =>
      h("div", { class: `band ${m.cls}`, style: `top:${PAD_PX + (line - 1) * this.linePx}px;height:${this.linePx}px`, "data-line": line })));
  }

  /** Puts the caret at the start of `line` and brings it into view. */
  reveal(line) {
    const lines = this.area.value.split("\n");
    const at = lines.slice(0, line - 1).reduce((s, l) => s + l.length + 1, 0);
    this.area.setSelectionRange(at, at);
    this.gutter.children[line - 1]?.scrollIntoView({ block: "nearest" });
  }
}
