// "Download script" and "Download notebook": the run on screen as a file (POST /api/export),
// the learner's formulas included. main.js hands over each drawn run.
import { errorText, exportFile } from "./api.js";

export class ExportButtons {
  /** `buttons`: each with data-format "py" or "ipynb"; `statusEl`: where a failure is said. */
  constructor(buttons, statusEl) {
    this.buttons = [...buttons];
    this.statusEl = statusEl;
    this.config = null;
    this.follow = null; // the followed element ({grad, index}), printed as a check in the file
    for (const btn of this.buttons) btn.addEventListener("click", () => this.download(btn));
  }

  /** The run now on screen (the response as drawn): its config, every default filled in. An
   * exercise's hidden formulas must not leave the page: the file shows the learner's own
   * formula for each (`hide`), and until the learner has written them the buttons stay off.
   * `hidden`: the lab's hidden gradients ("x.g"). */
  load(data, hidden = []) {
    const { reference_heatmaps, ...run } = data.config; // the page's view option, not the run's
    const formulas = run.formulas || {};
    hidden = [...new Set([...hidden, ...data.backward.filter((b) => b.hidden).map((b) => `${b.grad}.g`)])];
    const unwritten = hidden.filter((key) => !(key in formulas));
    this.config = run;
    this.hide = hidden.filter((key) => key in formulas);
    for (const btn of this.buttons) btn.disabled = unwritten.length > 0;
    this.statusEl.textContent = unwritten.length ? `Write ${unwritten.join(", ")} to download this exercise.` : "";
  }

  async download(btn) {
    if (!this.config) return;
    const format = btn.dataset.format;
    btn.disabled = true;
    this.statusEl.textContent = "";
    try {
      const config = this.follow ? { ...this.config, follow: this.follow } : this.config;
      await exportFile({ config, format, hide: this.hide }, `broadprop_run.${format}`);
    } catch (err) {
      this.statusEl.textContent = `Export failed: ${errorText(err)}`;
    } finally {
      btn.disabled = false;
    }
  }
}
