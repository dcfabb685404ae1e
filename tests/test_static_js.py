"""static/js as one house (issue 29): every colour scale in colours.js, and every export
imported by some module (an export nobody imports is dead code that reads as an interface:
GRAD_COLOUR, gradOf were). Imports are the modules' own
`import {...} from`, `import * as m from` (then `m.name`), and dynamic `import("./x.js")`
destructured (`const { a } = await import(...)`, or a list of them under `Promise.all`); an
entry module's `export default` is the page's or the notebook widget's."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JS = ROOT / "static" / "js"

EXPORT = re.compile(r"^export\s+(?:async\s+)?(?:const|let|var|function\*?|class)\s+([\w$]+)", re.M)
EXPORT_LIST = re.compile(r"^export\s*\{([^}]*)\}", re.M)
STATIC_IMPORT = re.compile(
    r"""\bimport\s*(?:\{([^}]*)\}|\*\s*as\s+([\w$]+))\s*from\s*["']\./([\w.-]+\.js)["']"""
)
ONE_DYNAMIC = re.compile(
    r"""const\s*\{([^}]*)\}\s*=\s*await\s+import\(\s*["']\./([\w.-]+\.js)["']\s*\)"""
)
ALL_DYNAMIC = re.compile(r"const\s*\[(.*?)\]\s*=\s*await\s+Promise\.all\(\s*\[(.*?)\]\s*\)", re.S)
DYNAMIC = re.compile(r"""import\(\s*["']\./([\w.-]+\.js)["']\s*\)""")


def _names(group: str) -> set[str]:
    """`a, b as c` -> {"a", "b"}: the exported names an import list reads."""
    return {
        part.split(" as ")[0].split(":")[0].strip() for part in group.split(",") if part.strip()
    }


def exports() -> dict[str, set[str]]:
    out = {}
    for path in sorted(JS.glob("*.js")):
        text = path.read_text()
        names = set(EXPORT.findall(text))
        for group in EXPORT_LIST.findall(text):
            names |= {part.split(" as ")[-1].strip() for part in group.split(",") if part.strip()}
        out[path.name] = names
    return out


def imports() -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    for path in sorted(JS.glob("*.js")):
        text = path.read_text()
        for names, star, module in STATIC_IMPORT.findall(text):
            read = (
                _names(names) if names else set(re.findall(rf"\b{re.escape(star)}\.([\w$]+)", text))
            )
            used.setdefault(module, set()).update(read)
        for names, module in ONE_DYNAMIC.findall(text):
            used.setdefault(module, set()).update(_names(names))
        for patterns, calls in ALL_DYNAMIC.findall(text):
            for names, module in zip(re.findall(r"\{([^}]*)\}", patterns), DYNAMIC.findall(calls)):
                used.setdefault(module, set()).update(_names(names))
    return used


def unimported() -> dict[str, list[str]]:
    used = imports()
    return {m: sorted(names - used.get(m, set())) for m, names in exports().items()
            if names - used.get(m, set())}  # fmt: skip


def test_every_export_of_static_js_is_imported_somewhere():
    assert unimported() == {}


def test_the_scan_reads_every_kind_of_import():
    used = imports()
    assert "drawFlow" in used["program-diagram.js"]  # import { drawFlow } from
    assert "Diagram" in used["diagram.js"]  # const [..., { Diagram, ... }] = await Promise.all
    assert used["api.js"]  # import * as api from "./api.js", then api.program(...)
    assert "actionColour" in exports()["colours.js"]


# a colour scale's stop (`[0, "#2166ac"]`) or one of Plotly's named scales (`colorscale: "RdBu"`)
SCALE_STOP = re.compile(r"""\[\s*0(?:\.\d+)?\s*,\s*["']#[0-9a-fA-F]{3,8}["']\s*\]""")
NAMED_SCALE = re.compile(r"""colorscale\s*:\s*["']""")


def test_every_colour_scale_lives_in_colours_js():
    found = [
        f"{path.name}: {match.group(0)}"
        for path in sorted(JS.glob("*.js"))
        if path.name != "colours.js"
        for pattern in (SCALE_STOP, NAMED_SCALE)
        for match in pattern.finditer(path.read_text())
    ]
    assert found == []
    text = (JS / "colours.js").read_text()
    assert SCALE_STOP.search(text) and "export function toleranceScale" in text
