"""GET /: the visualizer page, and Plotly.js served from the installed plotly package."""

from pathlib import Path
from typing import Any

import plotly
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.templating import Jinja2Templates

from app.schemas import RunRequest

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).resolve().parents[2] / "templates")

PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
PLOTLY_URL = f"/vendor/plotly-{plotly.__version__}.min.js"  # versioned: safe to cache forever


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
PAGE_OWNED = frozenset({"reference_heatmaps", "formulas"})  # formulas: lab.js


def run_fields() -> list[dict[str, Any]]:
    """Every POST /api/run field with the limits from its schema, in the schema's order."""
    props = RunRequest.model_json_schema()["properties"]
    defaults = RunRequest().model_dump()
    return [
        _field(name, prop, defaults[name]) for name, prop in props.items() if name not in PAGE_OWNED
    ]


@router.get("/", response_class=HTMLResponse)
def index(request: Request) -> HTMLResponse:
    return templates.TemplateResponse(
        request, "index.html", {"fields": run_fields(), "plotly_url": PLOTLY_URL}
    )


@router.get("/vendor/plotly-{version}.min.js")
def plotly_js(version: str) -> FileResponse:
    if version != plotly.__version__:
        raise HTTPException(status_code=404)
    return FileResponse(
        PLOTLY_JS,
        media_type="text/javascript",
        headers={"Cache-Control": "public, max-age=31536000, immutable"},
    )
