"""/openapi.json with exact integer limits."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def exact_openapi(app: FastAPI, models: ModuleType) -> Callable[[], dict[str, Any]]:
    """app.openapi, with the integer limits pydantic wrote restored exactly: FastAPI's OpenAPI
    model stores `maximum` as a float, which turns the seed's 2^63 - 1 into 2^63. `models`:
    the module whose pydantic models name the schema's components."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        schema = generate()
        if fresh:
            components = schema.get("components", {}).get("schemas", {})
            for name, component in components.items():
                model = getattr(models, name.removesuffix("-Input").removesuffix("-Output"), None)
                if isinstance(model, type) and issubclass(model, BaseModel):
                    mode = "serialization" if name.endswith("-Output") else "validation"
                    components[name] = _exact_ints(component, model.model_json_schema(mode=mode))
        return schema

    return openapi


def _exact_ints(generated: Any, source: Any) -> Any:
    """`generated`, with each float that stands for an int of `source` at the same place
    replaced by that int."""
    if isinstance(generated, dict) and isinstance(source, dict):
        return {k: _exact_ints(v, source[k]) if k in source else v for k, v in generated.items()}
    if isinstance(generated, list) and isinstance(source, list) and len(generated) == len(source):
        return [_exact_ints(g, s) for g, s in zip(generated, source)]
    if isinstance(generated, float) and _is_int(source) and float(source) == generated:
        return source
    return generated
