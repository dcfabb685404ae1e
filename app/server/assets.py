"""The page's files: static assets under versioned URLs (cached for good), JS modules whose
relative imports carry the same version, and the Plotly bundle, gzipped once in memory.

The version is a hash of every static file's name, size and mtime: any edit gives every URL a
new version, so a browser never mixes old and new modules, and never asks again for a URL
it has (`Cache-Control: immutable`). An unversioned or outdated URL is served `no-cache`."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import re
import threading
from pathlib import Path
from urllib.parse import parse_qs

from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "static"
VENDOR = ROOT / "vendor"  # scripts/_setup.sh puts the npm cartesian bundle here (ignored by git)
# found, not imported: the Python package itself is of no use to the server
FULL_PLOTLY = (
    Path(importlib.util.find_spec("plotly").origin).parent / "package_data" / "plotly.min.js"
)
IMMUTABLE = "public, max-age=31536000, immutable"
# `from "./x.js"`, `import "./x.js"`, `import("./x.js")`: relative module specifiers only
IMPORT = re.compile(r"""((?:\bfrom|\bimport)\s*\(?\s*["'])(\.{1,2}/[^"'?]+\.js)(["'])""")


def bundled_plotly_version() -> str:
    """The plotly.js version inside the Python package's bundle ("4.1.1")."""
    with FULL_PLOTLY.open("rb") as f:
        head = f.read(300).decode("latin-1")
    m = re.search(r"plotly\.js[^\n]*?v(\d+\.\d+\.\d+)", head)
    if m is None:
        raise RuntimeError(f"no plotly.js version in the header of {FULL_PLOTLY}")
    return m.group(1)


def plotly_bundle() -> tuple[str, Path]:
    """(URL file name, path): the cartesian bundle of the same plotly.js version when
    scripts/_setup.sh could fetch it, else the Python package's full bundle."""
    version = bundled_plotly_version()
    cartesian = VENDOR / f"plotly-cartesian-{version}.min.js"
    if cartesian.is_file():
        return cartesian.name, cartesian
    return f"plotly-{version}.min.js", FULL_PLOTLY


class _Gzipped:
    """A file's bytes and their gzip, made once (per mtime) and kept."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[int, bytes, bytes]] = {}

    def get(self, path: Path) -> tuple[bytes, bytes]:
        mtime = path.stat().st_mtime_ns
        with self._lock:
            hit = self._cache.get(path)
            if hit is None or hit[0] != mtime:
                raw = path.read_bytes()
                hit = (mtime, raw, gzip.compress(raw, compresslevel=9, mtime=0))
                self._cache[path] = hit
        return hit[1], hit[2]


GZIPPED = _Gzipped()


def warm() -> None:
    """Gzip the Plotly bundle in a background thread, so the first visitor does not wait."""
    threading.Thread(target=lambda: GZIPPED.get(plotly_bundle()[1]), daemon=True).start()


def serve_file(path: Path, accept_encoding: str, cache_control: str = IMMUTABLE) -> Response:
    """A JS file, gzipped when the client takes gzip (compressed once, not per request)."""
    raw, packed = GZIPPED.get(path)
    headers = {"Cache-Control": cache_control, "Vary": "Accept-Encoding"}
    if "gzip" in accept_encoding:
        headers["Content-Encoding"] = "gzip"
        return Response(packed, media_type="text/javascript", headers=headers)
    return Response(raw, media_type="text/javascript", headers=headers)


def asset_version() -> str:
    """A short hash of every static file's name, size and mtime (a stat per file: cheap)."""
    h = hashlib.sha1()
    for p in sorted(STATIC.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(STATIC)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:12]


def asset_url(path: str) -> str:
    """`asset('js/main.js')` in a template: /static/js/main.js?v=<version>."""
    return f"/static/{path.lstrip('/')}?v={asset_version()}"


class VersionedStatic(StaticFiles):
    """StaticFiles with the caching above; JS modules' relative imports get `?v=<version>`."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        if response.status_code not in (200, 304):
            return response
        version = asset_version()
        asked = parse_qs(scope.get("query_string", b"").decode()).get("v", [None])[0]
        cache = IMMUTABLE if asked == version else "no-cache"
        if path.endswith(".js") and response.status_code == 200:
            text = (STATIC / path).read_text(encoding="utf-8")
            text = IMPORT.sub(lambda m: f"{m[1]}{m[2]}?v={version}{m[3]}", text)
            return Response(
                text,
                media_type="text/javascript",
                headers={"Cache-Control": cache},
            )
        response.headers["Cache-Control"] = cache
        return response
