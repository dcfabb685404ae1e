"""Strict, fast JSON: orjson writes numpy arrays natively and NaN/Infinity as null."""

from typing import Any

import orjson
from fastapi.responses import JSONResponse


class StrictJSONResponse(JSONResponse):  # a JSONResponse, so OpenAPI shows the response_model
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
