// Presentation mode, for a projector: a compact header that scrolls away, the configuration in
// a drawer, large diagram and code, one section at a time (tabs, or PageUp / PageDown), and the
// arrow keys moving through the steps. The drawer is also how narrow screens show the form.
import { h } from "./format.js";

export class Presenter {
  constructor({ toggle, drawerToggle, onChange, onKey }) {
    Object.assign(this, { toggle, drawerToggle, onChange, onKey });
    this.on = false;
    this.sections = [...document.querySelectorAll("main [data-section]")];
    this.names = [...new Set(this.sections.map((s) => s.dataset.section))];
    this.current = this.names[0];
    this.tabs = h("nav", { class: "present-tabs", "aria-label": "Sections" },
      ...this.names.map((n) => h("button", { type: "button", class: "secondary", "data-tab": n, onclick: () => this.show(n) }, TAB_LABELS[n] || n)));
    document.getElementById("main").prepend(this.tabs);
    toggle.addEventListener("click", () => this.set(!this.on, true));
    drawerToggle.addEventListener("click", () => this.setDrawer(!document.body.classList.contains("drawer-open")));
    document.addEventListener("keydown", (ev) => {
      if (!this.on || ev.altKey || ev.ctrlKey || ev.metaKey || ev.target.closest("input, select, textarea")) return;
      const i = this.names.indexOf(this.current);
      if (ev.key === "PageDown" || ev.key === "ArrowDown") this.show(this.names[Math.min(this.names.length - 1, i + 1)]);
      else if (ev.key === "PageUp" || ev.key === "ArrowUp") this.show(this.names[Math.max(0, i - 1)]);
      else if (ev.key === "Escape") this.setDrawer(false);
      else return;
      ev.preventDefault();
    });
  }

  /** Turn presentation mode on or off (`user`: from the toggle, so tell the page). */
  set(on, user = false) {
    this.on = on;
    document.body.classList.toggle("present", on);
    this.toggle.setAttribute("aria-pressed", on ? "true" : "false");
    this.toggle.textContent = on ? "Exit presentation" : "Present";
    this.tabs.hidden = !on;
    this.setDrawer(false);
    this.show(this.current);
    if (user) this.onChange();
  }

  setDrawer(open) {
    document.body.classList.toggle("drawer-open", open);
    this.drawerToggle.setAttribute("aria-expanded", open ? "true" : "false");
  }

  /** Open the configuration (e.g. to show an error next to its field). */
  openDrawer() {
    if (this.on || getComputedStyle(this.drawerToggle).display !== "none") this.setDrawer(true);
  }

  /** Show one section (in presentation mode; otherwise all are shown). */
  show(name) {
    this.current = name;
    for (const s of this.sections) s.classList.toggle("present-hidden", this.on && s.dataset.section !== name);
    for (const b of this.tabs.querySelectorAll("button")) b.setAttribute("aria-current", b.dataset.tab === name ? "true" : "false");
  }
}

const TAB_LABELS = { diagram: "Shape flow & steps", gradients: "Gradients", check: "Check", explainer: "Broadcasting", train: "Train" };
