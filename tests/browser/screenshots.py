"""Screenshots of the page's states for review and the README:
`.venv/bin/python tests/browser/screenshots.py [outdir]` (default docs/screenshots)."""

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).parent))
from conftest import CHROMIUM, CHROMIUM_ARGS, ROOT, server  # noqa: E402

STATES = {  # name: (query, what to do after load)
    "default": ("", None),
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
}


def wait_drawn(page) -> None:
    page.wait_for_function(
        "['ready', 'empty'].includes(document.body.dataset.state)"
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


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    gen = server.__wrapped__() if hasattr(server, "__wrapped__") else server()
    base = next(gen)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("console", lambda m: m.type == "error" and print("console:", m.text))
            for name, (query, action) in STATES.items():
                page.goto(f"{base}/{query}")
                page.wait_for_function(
                    "() => ['ready', 'empty'].includes(document.body.dataset.state)"
                    " && document.querySelector('#loading').hidden",
                    timeout=60_000,
                )
                if action == "difference":
                    page.check('input[name="grad-view"][value="difference"]')
                if action and action.startswith("lab"):
                    lab(page, action, out)
                if action == "step":
                    for _ in range(3):
                        page.keyboard.press("ArrowRight")
                page.wait_for_timeout(300)
                page.screenshot(path=out / f"{name}.png")
                if name == "default":
                    page.screenshot(path=out / "page.png")  # the README's picture
                page.screenshot(path=out / f"{name}-full.png", full_page=True)
                print("wrote", name)
            browser.close()
    finally:
        next(gen, None)


if __name__ == "__main__":
    main()
