"""The API's JSON response class (defined with the server's plumbing, app/server), and the
OpenAPI references its routes' error responses share."""

from app.server.responses import StrictJSONResponse

__all__ = ["JSON_ERROR", "VALIDATION_ERROR", "StrictJSONResponse"]

VALIDATION_ERROR = "#/components/schemas/HTTPValidationError"  # FastAPI's own 422 body
# errors are JSON, whatever a stream's media type
JSON_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorMessage"}}}
