"""The widget of %%backward: an anywidget whose ESM is the program page's own modules
(static/js/notebook.js and what it imports), read from static/js when the widget is made, and
whose state is the answer of POST /api/program's shape. A page cannot resolve `./format.js`
from a module anywidget loads from a blob, so the entry is a small loader: it makes each
module a blob URL, its relative imports pointed at the blobs already made, leaves first."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import anywidget
import traitlets

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "static"
ENTRY = "notebook.js"
# `from "./x.js"` and `import "./x.js"`: the page's modules import each other only so
IMPORT = re.compile(r"""\b(?:from|import)\s*["']\./([\w.-]+\.js)["']""")

LOADER = """\
const SOURCES = %s;
const ORDER = %s;
let loaded = null;
function load() {
  if (loaded) return loaded;
  const urls = {};
  for (const name of ORDER) {
    const source = SOURCES[name].replace(/\\b(from|import)(\\s*)(["'])\\.\\/([\\w.-]+\\.js)\\3/g,
      (all, word, space, quote, dep) => `${word}${space}${quote}${urls[dep]}${quote}`);
    urls[name] = URL.createObjectURL(new Blob([source], { type: "text/javascript" }));
  }
  return (loaded = import(urls[%s]));
}
export default {
  async render(context) {
    const module = await load();
    return module.default.render(context);
  },
};
"""


def _modules(entry: str = ENTRY) -> dict[str, str]:
    """The entry and every module it imports, leaves first (a module after its imports)."""
    ordered: dict[str, str] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in ordered:
            return
        if name in path:
            raise ValueError(f"static/js imports in a circle: {' -> '.join((*path, name))}")
        source = (STATIC / "js" / name).read_text()
        for dep in IMPORT.findall(source):
            visit(dep, (*path, name))
        ordered[name] = source

    visit(entry, ())
    return ordered


@functools.cache
def esm() -> str:
    modules = _modules()
    return LOADER % (json.dumps(modules), json.dumps(list(modules)), json.dumps(ENTRY))


@functools.cache
def css() -> str:
    """The program page's stylesheet, with the page's colours (its :root) on the widget."""
    page = (STATIC / "css" / "page.css").read_text()
    root = re.search(r":root\s*\{([^}]*)\}", page)
    colours = f".broadprop {{{root.group(1)}}}\n" if root else ""
    return (
        colours
        + (STATIC / "css" / "program.css").read_text()
        + (STATIC / "css" / "notebook.css").read_text()
    )


def plotly_source() -> str:
    """The page's Plotly: the cartesian bundle when scripts/_setup.sh fetched it, else the
    full bundle inside the plotly package (as app/server/assets.py chooses)."""
    import plotly

    full = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    cartesian = sorted((ROOT / "vendor").glob("plotly-cartesian-*.min.js"))
    return (cartesian[-1] if cartesian else full).read_text()


class CheckWidget(anywidget.AnyWidget):
    """One %%backward cell's check, drawn by the program page's modules."""

    _esm = traitlets.Unicode(esm()).tag(sync=True)
    _css = traitlets.Unicode(css()).tag(sync=True)
    answer = traitlets.Dict().tag(sync=True)
    notes = traitlets.List(traitlets.Unicode()).tag(sync=True)

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.on_msg(self._message)

    def _message(self, _widget: Any, content: Any, _buffers: Any) -> None:
        if isinstance(content, dict) and content.get("type") == "plotly":
            self.send({"type": "plotly", "source": plotly_source()})
