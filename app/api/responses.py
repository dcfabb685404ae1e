"""The API's JSON response class (defined with the server's plumbing, app/server)."""

from app.server.responses import StrictJSONResponse

__all__ = ["StrictJSONResponse"]
