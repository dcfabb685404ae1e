"""Screenshots of the page's states for the README and for review:

    .venv/bin/python tests/browser/screenshots.py                 # the README's pictures
    .venv/bin/python tests/browser/screenshots.py OUTDIR [--only state ...]  # every state's

Without OUTDIR only the README's pictures are written, in docs/screenshots (page, new-ops,
lab, data-panel, train-panel, follow-panel, program, program-gpt); `--only` narrows either to the states
named. Every picture the README embeds is made here (or by the test named in MADE_BY_TESTS):
tests/test_readme.py fails on one that is not, or that git does not keep."""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script: tests.* from the repository root
from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from tests.servers import LiveServer  # noqa: E402

STATES = {  # name: (query, what to do after load[, (width, height)])
    "default": ("", None),
    "phone": ("", None, (390, 844)),
    "projector": ("", None, (1920, 1080)),
    "present": ("?present=1", None, (1920, 1080)),
    "present-numbers": ("?batch=2&in_features=3&hidden=4&present=1", None, (1920, 1080)),
    "numbers": ("?batch=2&in_features=3&hidden=4", "numbers"),
    "deep": ("?batch=8&in_features=6&hidden=64,64,64,64", None),
    "matmul": ("?strategy=matmul", None),
    "small": ("?batch=8&in_features=6&hidden=4,3&seed=3", None),
    "step": ("?batch=8&in_features=6&hidden=4,3&seed=3", "step"),
    "difference": ("?batch=64&in_features=20&hidden=16", "difference"),
    "compare-fd": ("?compare=true&fd_samples=8", None),
    "lead-dims": ("?batch=4,16&in_features=12&hidden=8&activation=tanh", None),
    "new-ops": (
        "?batch=16&in_features=10&hidden=8&out_features=4&norm=layernorm&loss=cross_entropy",
        None,
    ),
    "error": ("?batch=0&hidden=4,-1", None),
    "budget": ("?batch=20000&hidden=4096", None),
    "lab-exercise": ("?hide=x.g,w1.g", "lab"),  # its code card is the README's lab.png
    "lab-break": ("?batch=32&in_features=24&hidden=16", "lab-break"),
    # image data, then 2,000 steps of training: the panels themselves are the pictures
    "data": ("?data=mnist&loss=cross_entropy&init=kaiming&hidden=50&batch=64", "data"),
    # one x.g element followed back to its 50 products (the panel is the README's picture)
    "follow": ("?follow=x.g:3,100", "follow", (1280, 1600)),
    "train": (
        "?data=mnist&loss=cross_entropy&init=kaiming&init_scale=0.1&hidden=20&batch=64",
        "train",
    ),
    # the program page: makemore with tanh's derivative taken from its input (README program.png)
    "program": ("program?preset=makemore", "program", (1440, 1100)),
    "program-gpt": ("program?preset=gpt", None, (1440, 1100)),  # the README's GPT preset
}
# the program state's slip: the first failure marked at its row and at its line
TANH_SLIP = ("dhpreact = (1.0 - h ** 2) * dh", "dhpreact = (1.0 - hpreact ** 2) * dh")
PANELS = {"data": "#data-panel", "train": "#train-panel", "follow": "#follow-panel"}
# the README's pictures: file -> the state that makes it
README_PICTURES = {
    "page.png": "default",
    "new-ops.png": "new-ops",
    "lab.png": "lab-exercise",
    "data-panel.png": "data",
    "train-panel.png": "train",
    "follow-panel.png": "follow",
    "program.png": "program",
    "program-gpt.png": "program-gpt",
}
# README pictures a browser test makes as it checks what they show
MADE_BY_TESTS = {
    "notebook-widget.png": "tests/browser/test_notebook_widget.py",
    "notebook-jupyterlab.png": "tests/notebook/test_jupyterlab.py",
    "notebook-jupyterlab-widget.png": "tests/notebook/test_jupyterlab.py",
}


def wait_drawn(page) -> None:
    page.wait_for_function(
        "() => ['ready', 'empty'].includes(document.body.dataset.state)"
        " && document.querySelector('#loading').hidden",
        timeout=60_000,
    )


def lab(page, action: str, out: Path) -> None:
    """An exercise half done (w1.g written and passing, x.g refused at its formula), or a
    gallery bug applied, with the difference map scaled to the tolerance."""
    if action == "lab":
        for key, text in (("w1.g", "x.T @ l1.g"), ("x.g", "(l1.g.unsqueeze(-1) * w1).sum(-1)")):
            page.fill(f'li[data-key="{key}"] textarea', text)
            page.click(f'li[data-key="{key}"] button.lab-check')
            wait_drawn(page)
        page.evaluate(
            "window.scrollTo(0, document.querySelector('#h-step').closest('section').offsetTop - 96)"
        )
        page.evaluate("document.querySelector('.top').style.position = 'static'")
        page.locator("section:has(#h-step)").screenshot(path=out / "lab.png")
        page.evaluate("document.querySelector('.top').style.position = ''")
    else:
        page.select_option("#lab-bugs", "x-abs-in-the-wrong-place")
        wait_drawn(page)
        page.check('input[name="grad-view"][value="difference"]')
        page.evaluate(
            "window.scrollTo(0, document.querySelector('#h-grads').closest('section').offsetTop - 96)"
        )


def program(page) -> None:
    """makemore with the tanh slip: the check marks it first, its line in the pane."""
    runs = page.evaluate("() => Number(document.body.dataset.runs || 0)")
    area = page.locator("#backward-editor textarea")
    area.fill(area.input_value().replace(*TANH_SLIP))
    page.wait_for_function(
        f"() => Number(document.body.dataset.runs || 0) > {runs}"
        " && document.body.dataset.state === 'ready'",
        timeout=90_000,
    )
    page.set_viewport_size({"width": 1440, "height": 1560})  # the check's marked row too
    page.evaluate("window.scrollTo(0, 0)")
    page.wait_for_timeout(300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", type=Path, help="every state's pictures go here")
    parser.add_argument("--only", nargs="*", choices=list(STATES), help="these states only")
    args = parser.parse_args()
    readme = args.out is None
    names = args.only or (list(dict.fromkeys(README_PICTURES.values())) if readme else STATES)
    final = ROOT / "docs" / "screenshots" if readme else args.out
    final.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp()) if readme else final
    live = LiveServer()
    base = live.base
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            warm = browser.new_page()  # the server's first run is slow: not the one to show
            warm.goto(f"{base}/")
            warm.wait_for_function("() => document.body.dataset.state === 'ready'", timeout=60_000)
            warm.close()
            for name in names:
                query, action, *size = STATES[name]
                width, height = size[0] if size else (1280, 800)
                page = browser.new_page(viewport={"width": width, "height": height})
                page.on("console", lambda m: m.type == "error" and print("console:", m.text))
                page.goto(f"{base}/{query}")
                page.wait_for_function(
                    "() => ['ready', 'empty'].includes(document.body.dataset.state)"
                    " && document.querySelector('#loading').hidden"
                    " && (document.body.dataset.pendingAll || '0') === '0'",
                    timeout=60_000,
                )
                if action == "difference":
                    page.check('input[name="grad-view"][value="difference"]')
                    page.locator("#heatmaps").scroll_into_view_if_needed()
                if action == "numbers":
                    page.locator("#step-detail").scroll_into_view_if_needed()
                if action and action.startswith("lab"):
                    lab(page, action, out)
                if action == "follow":
                    page.wait_for_function(
                        "() => document.querySelector('#follow-chart')?.dataset.drawn === '1'",
                        timeout=60_000,
                    )
                if action == "step":
                    for _ in range(3):
                        page.keyboard.press("ArrowRight")
                if action == "program":
                    program(page)
                if action == "train":
                    page.fill("#t-steps", "2000")
                    page.click("#train-start")
                    page.wait_for_function(
                        "() => document.getElementById('train-panel').dataset.state === 'done'",
                        timeout=600_000,
                    )
                page.wait_for_timeout(300)
                if action in PANELS:  # the panel alone, without the sticky header over it
                    page.add_style_tag(content=".top { position: static; }")
                    page.wait_for_timeout(300)  # laid out again before the panel's box is read
                    page.locator(PANELS[action]).screenshot(path=out / f"{name}-panel.png")
                page.screenshot(path=out / f"{name}.png")
                if name == "default":
                    page.screenshot(path=out / "page.png")  # the README's picture
                page.screenshot(path=out / f"{name}-full.png", full_page=True)
                page.close()
                print("wrote", name)
            browser.close()
    finally:
        live.stop()
    if readme:
        for picture in README_PICTURES:
            if (out / picture).exists():
                shutil.copy(out / picture, final / picture)
                print("README picture:", final / picture)
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
