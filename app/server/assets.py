"""The page's files: static assets under versioned URLs (cached for good), JS modules whose
relative imports carry the same version, and the Plotly bundle, gzipped once in memory.

The version is a hash of every static file's name, size and mtime: any edit gives every URL a
new version, so a browser never mixes old and new modules, and never asks again for a URL
it has (`Cache-Control: immutable`). An unversioned or outdated URL is served `no-cache`."""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import math
import posixpath
import re
import threading
import time
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs

from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
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


VERSION_TTL_S = 1.0  # an edit shows in the URLs within a second; a page's requests share one
_version: tuple[float, str] = (-math.inf, "")


def asset_version() -> str:
    """A short hash of every static file's name, size and mtime (a stat per file), taken at
    most once a second: a page load asks for it once per file it fetches."""
    global _version
    now = time.monotonic()
    if now - _version[0] < VERSION_TTL_S:
        return _version[1]
    h = hashlib.sha1()
    for p in sorted(STATIC.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(STATIC)}:{st.st_size}:{st.st_mtime_ns};".encode())
    _version = (now, h.hexdigest()[:12])
    return _version[1]


@functools.lru_cache(maxsize=256)
def _module(path: str, version: str) -> tuple[bytes, bytes]:
    """A JS module's text with `?v=<version>` on its relative imports, and its gzip: made once
    per version, not per request."""
    text = (STATIC / path).read_text(encoding="utf-8")
    raw = IMPORT.sub(lambda m: f"{m[1]}{m[2]}?v={version}{m[3]}", text).encode()
    return raw, gzip.compress(raw, compresslevel=6, mtime=0)


@functools.lru_cache(maxsize=64)
def _imports_of(path: str, version: str) -> tuple[str, ...]:
    """The static paths a module imports (relative imports, resolved)."""
    text = (STATIC / path).read_text(encoding="utf-8")
    base = PurePosixPath(path).parent
    return tuple(posixpath.normpath(str(base / m[2])) for m in IMPORT.finditer(text))


def preload_modules(*entries: str) -> list[str]:
    """Versioned URLs of every module the entries import, directly or not (the entries
    excepted), for `<link rel="modulepreload">`: the browser fetches the whole graph at once
    instead of one level of imports per round trip."""
    version = asset_version()
    seen: list[str] = []
    todo = list(entries)
    while todo:
        path = todo.pop(0)
        for imported in _imports_of(path, version):
            if imported not in seen and imported not in entries:
                seen.append(imported)
                todo.append(imported)
    return [f"/static/{p}?v={version}" for p in seen]


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
            raw, packed = _module(path, version)
            headers = {"Cache-Control": cache, "Vary": "Accept-Encoding"}
            if "gzip" in Headers(scope=scope).get("accept-encoding", ""):
                headers["Content-Encoding"] = "gzip"
                return Response(packed, media_type="text/javascript", headers=headers)
            return Response(raw, media_type="text/javascript", headers=headers)
        response.headers["Cache-Control"] = cache
        return response
