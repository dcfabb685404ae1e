"""/docs: Swagger UI from files shipped in the fastapi-offline package, so it works offline,
started by static/js/docs.js (no inline script: the CSP allows this origin's files only)."""

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, HTMLResponse

router = APIRouter(include_in_schema=False)
ASSETS = Path(fastapi_offline.__file__).parent / "static"
SERVED = frozenset({"swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"})

PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Broadprop API</title>
  <link rel="stylesheet" href="/docs/assets/swagger-ui.css">
  <link rel="icon" href="/docs/assets/favicon.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/assets/swagger-ui-bundle.js"></script>
  <script src="/static/js/docs.js"></script>
</body>
</html>
"""


@router.get("/docs")
def swagger_ui() -> HTMLResponse:
    return HTMLResponse(PAGE)


@router.get("/docs/assets/{name}")
def swagger_asset(name: str) -> FileResponse:
    if name not in SERVED:  # a fixed allow-list: no path from the client reaches the disk
        raise HTTPException(status_code=404)
    return FileResponse(ASSETS / name)
