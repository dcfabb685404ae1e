"""GET /: the visualizer page, and Plotly.js (the cartesian bundle, or the plotly package's)."""

from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates

from app.schemas import RunRequest, TrainRequest
from app.server import assets

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).resolve().parents[2] / "templates")
templates.env.globals["asset"] = assets.asset_url  # {{ asset('js/main.js') }}: a versioned URL
# {% for url in preload_modules('js/main.js') %}: every module those import, to fetch at once
templates.env.globals["preload_modules"] = assets.preload_modules
# `tojson` keeps a dict's order: a program's inputs are made in the order given (so sorted
# keys would draw other numbers than the preset's request as sent)
templates.env.policies["json.dumps_kwargs"] = {"sort_keys": False}


def _num(value: Any) -> str:
    return (
        "2^63-1" if value == 2**63 - 1 else f"{value:,}" if isinstance(value, int) else f"{value:g}"
    )


def _hint(spec: dict[str, Any]) -> str:
    """The limits in words, under the input: "1 … 16,384", "0–8 sizes, each 1 … 4,096"."""
    if spec["kind"] in ("int", "float") and spec.get("max") is not None:
        return f"{_num(spec['min'])} … {_num(spec['max'])}"
    if spec["kind"] == "int_or_list":
        return f"1 to {spec['max_items']} sizes, each {_num(spec['min'])} … {_num(spec['max'])}"
    if spec["kind"] == "list":
        return f"{spec['min_items']}–{spec['max_items']} sizes, each {_num(spec['min'])} … {_num(spec['max'])}"
    return ""


def _field(name: str, prop: dict[str, Any], default: Any) -> dict[str, Any]:
    """One RunRequest field as the form needs it: kind, limits, default, options."""
    spec: dict[str, Any] = {
        "name": name,
        "label": name.replace("_", " "),
        "description": prop.get("description", ""),
        "default": default,
    }
    variants = prop.get("anyOf", [prop])
    scalar = next((v for v in variants if v.get("type") in ("integer", "number")), None)
    array = next((v for v in variants if v.get("type") == "array"), None)
    if "enum" in prop:
        spec["kind"] = "choice"
        spec["options"] = list(prop["enum"])
    elif prop.get("type") == "boolean":
        spec["kind"] = "bool"
    elif array is not None:
        items = array.get("items", {})
        spec["kind"] = "int_or_list" if scalar is not None else "list"
        spec["min"] = items.get("minimum")
        spec["max"] = items.get("maximum")
        spec["min_items"] = array.get("minItems", 0)
        spec["max_items"] = array.get("maxItems")
    elif scalar is not None:
        spec["kind"] = "int" if scalar["type"] == "integer" else "float"
        spec["min"] = scalar.get("minimum")
        spec["max"] = scalar.get("maximum")
    else:
        spec["kind"] = "text"
    spec["value"] = ",".join(map(str, default)) if isinstance(default, list) else default
    if isinstance(default, bool):
        spec["value"] = "true" if default else "false"
    spec["hint"] = _hint(spec)
    return spec


# Fields the page sets itself (static/js/api.js), not the user: no input, not in the URL.
# formulas: a dict, edited by the formula lab, not a text input of the form; follow: set by a
# click on a heatmap cell (static/js/follow.js).
PAGE_OWNED = frozenset({"reference_heatmaps", "formulas", "follow"})


def run_fields() -> list[dict[str, Any]]:
    """Every POST /api/run field with the limits from its schema, in the schema's order."""
    props = RunRequest.model_json_schema()["properties"]
    defaults = RunRequest().model_dump()
    return [
        _field(name, prop, defaults[name]) for name, prop in props.items() if name not in PAGE_OWNED
    ]


def train_fields() -> list[dict[str, Any]]:
    """The fields POST /api/train adds to a run's (steps, lr, ...), with their limits."""
    props = TrainRequest.model_json_schema()["properties"]
    defaults = TrainRequest().model_dump()
    for prop in props.values():  # lr > 0, momentum < 1: the input's bounds (the 422 is exact)
        prop.setdefault("minimum", prop.get("exclusiveMinimum"))
        prop.setdefault("maximum", prop.get("exclusiveMaximum"))
    return [_field(n, props[n], defaults[n]) for n in props if n not in RunRequest.model_fields]


@router.get("/", response_class=HTMLResponse)
def index(request: Request) -> HTMLResponse:
    name, _ = assets.plotly_bundle()
    context = {
        "fields": run_fields(),
        "train_fields": train_fields(),
        "plotly_url": f"/vendor/{name}",
    }
    return templates.TemplateResponse(request, "index.html", context)


@router.get("/program", response_class=HTMLResponse)
def program_page(request: Request) -> HTMLResponse:
    """The program mode: a forward and a backward written as lines, checked line by line
    (`?preset=<id>` opens a preset; the texts and inputs live in the query string)."""
    from app.programs.presets import PRESETS
    from app.programs.schemas import ProgramTrainRequest

    name, _ = assets.plotly_bundle()
    defaults = ProgramTrainRequest.model_fields
    context = {
        "presets": PRESETS,
        "plotly_url": f"/vendor/{name}",
        "train_defaults": {k: defaults[k].default for k in ("steps", "batch", "lr", "seed")},
    }
    return templates.TemplateResponse(request, "program.html", context)


@router.get("/vendor/{name}")
def plotly_js(name: str, request: Request) -> Response:
    """The Plotly bundle; its name carries its version, so it is cached for good."""
    served, path = assets.plotly_bundle()
    if name != served:
        raise HTTPException(status_code=404)
    return assets.serve_file(path, request.headers.get("accept-encoding", ""))
