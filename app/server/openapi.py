"""/openapi.json with exact integer limits."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def exact_openapi(
    app: FastAPI, models: ModuleType, body_models: tuple[type[BaseModel], ...] = ()
) -> Callable[[], dict[str, Any]]:
    """app.openapi, with the integer limits pydantic wrote restored exactly: FastAPI's OpenAPI
    model stores `maximum` as a float, which turns the seed's 2^63 - 1 into 2^63. `models`:
    the module whose pydantic models name the schema's components. `body_models`: the bodies
    of routes that read their bytes themselves (a sandbox worker validates them), added to
    the components that their routes' `$ref`s name."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        schema = generate()
        if fresh:
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in body_models:
                _add_component(components, model)
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


def _add_component(components: dict[str, Any], model: type[BaseModel]) -> None:
    """`model`'s validation schema as a component, its nested models beside it."""
    found = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, nested in found.pop("$defs", {}).items():
        components.setdefault(name, nested)
    components.setdefault(model.__name__, found)
