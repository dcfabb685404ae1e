"""The %%backward widget in Chromium (issue 33): its ESM (the page's own modules behind the
loader app/notebook/widget.py writes) loaded from a blob as anywidget loads it, rendered with
a model that holds a real check; it draws the check table, each line's shapes and, after
asking the "kernel" for Plotly, the selected gradient's heatmaps. No kernel: the model is the
small object anywidget hands `render` (get, on, off, send)."""

from __future__ import annotations

from pathlib import Path

import torch

from app.notebook import widget
from app.notebook.check import check

ROOT = Path(__file__).resolve().parents[2]
ORIGIN = "http://widget.test/"

HARNESS = """async ({ esm, answer, plotly }) => {
  const state = { answer, notes: [] };
  const listeners = {};
  window.sent = [];
  const model = {
    get: (key) => state[key],
    on: (ev, cb) => (listeners[ev] ||= []).push(cb),
    off: (ev, cb) => (listeners[ev] = (listeners[ev] || []).filter((f) => f !== cb)),
    send: (msg) => {
      window.sent.push(msg.type);
      if (msg.type === "plotly") setTimeout(() => (listeners["msg:custom"] || []).forEach((cb) => cb({ type: "plotly", source: plotly })), 0);
    },
  };
  const style = document.createElement("style");
  style.textContent = window.css;
  document.head.append(style);
  const url = URL.createObjectURL(new Blob([esm], { type: "text/javascript" }));
  const module = await import(url);
  await module.default.render({ model, el: document.getElementById("host") });
}"""


def _answer() -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g)
    W = torch.randn(4, 3, generator=g).requires_grad_()
    b = torch.randn(3, generator=g).requires_grad_()
    out = x @ W + b
    out.retain_grad()
    loss = (out**2).mean()
    loss.backward()
    text = "dout = 2 * out / out.numel()\ndW = x.T @ dout\ndb = dout.sum(0) * 2\n"
    report = check(text, {"x": x, "W": W, "b": b, "out": out, "loss": loss})
    assert report.first_failure == "b"
    return report.json()


def test_the_widget_draws_the_check_table_and_a_heatmap(browser, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.route(ORIGIN, lambda route: route.fulfill(
        content_type="text/html", body='<!doctype html><meta charset="utf-8"><div id="host"></div>'))  # fmt: skip
    page.goto(ORIGIN)
    page.evaluate("(css) => { window.css = css; }", widget.css())
    page.evaluate(
        HARNESS, {"esm": widget.esm(), "answer": _answer(), "plotly": widget.plotly_source()}
    )
    rows = page.locator(".broadprop table.checks tbody tr[data-name]")
    assert rows.count() == 3
    assert (
        page.locator(".broadprop .verdict-line")
        .inner_text()
        .startswith("✗ First wrong gradient: db")
    )
    assert page.locator("tr.st-first[data-name=b]").count() == 1
    page.wait_for_selector(".broadprop[data-maps=b] .map .main-svg", timeout=20_000)
    assert page.locator(".broadprop .map .heatmaplayer").count() >= 2
    rows.filter(has_text="dW").first.click()  # select another gradient: its maps follow
    page.wait_for_selector(".broadprop[data-maps=W]", timeout=10_000)
    assert page.evaluate("window.sent") == ["plotly"]  # Plotly asked for once
    shots = ROOT / "docs" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "notebook-widget.png"), full_page=True)
    assert errors == []
    page.close()
