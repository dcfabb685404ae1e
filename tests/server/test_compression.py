"""Response compression (app/server/compression.py): ISA-L's gzip, which any gzip reader
reads, whole and streamed, on the event loop and in a thread; identity for a client that
does not take gzip."""

from __future__ import annotations

import gzip
import json
import platform

import pytest
from starlette.applications import Starlette
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from app.server import compression

# numbers as an answer holds them: compressible, but not trivially
BODY = json.dumps({"z": [[round(0.001 * i * j - 0.37, 7) for j in range(40)] for i in range(60)]})


def _app() -> Starlette:
    big = (BODY * (compression.THREAD_MINIMUM_BYTES // len(BODY) + 2)).encode()

    async def whole(request):
        return Response(BODY, media_type="application/json")

    async def large(request):  # over the thread threshold: compressed off the event loop
        return Response(big, media_type="application/json")

    async def streamed(request):
        async def parts():
            for _ in range(5):
                yield BODY.encode()

        return StreamingResponse(parts(), media_type="application/json")

    app = Starlette(routes=[Route("/whole", whole), Route("/large", large),
                            Route("/streamed", streamed)])  # fmt: skip
    app.add_middleware(compression.GZipMiddleware, minimum_size=1024)
    return app


def _raw(client: TestClient, path: str, encoding: str = "gzip") -> tuple[dict, bytes]:
    """The response's headers and its bytes as sent (not decoded by the client)."""
    with client.stream("GET", path, headers={"accept-encoding": encoding}) as r:
        return dict(r.headers), b"".join(r.iter_raw())


def test_isa_l_is_what_compresses_where_it_is_a_dependency():
    # pyproject.toml installs it on these machines: a fallback to zlib there means the install
    # lost it; elsewhere zlib serves
    wanted = platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64")
    assert compression.DEFLATE.__name__ == ("isal.isal_zlib" if wanted else "zlib")
    # and the responder compresses with it (Starlette's hook, overridden, still applies)
    made = compression.GZipResponder(None, 1024, compresslevel=compression.LEVEL).compressor
    assert type(made).__module__.startswith("isal" if wanted else "zlib"), type(made)


@pytest.mark.parametrize("path, copies", [("/whole", 1), ("/streamed", 5)])
def test_any_gzip_reader_reads_what_is_sent(path, copies):
    headers, sent = _raw(TestClient(_app()), path)
    assert headers["content-encoding"] == "gzip"
    assert len(sent) < len(BODY) * copies / 2
    assert gzip.decompress(sent) == BODY.encode() * copies  # the standard library's reader


def test_a_large_body_is_compressed_in_a_thread_alike():
    headers, sent = _raw(TestClient(_app()), "/large")
    assert headers["content-encoding"] == "gzip"
    plain = gzip.decompress(sent)
    assert len(plain) > compression.THREAD_MINIMUM_BYTES and plain.startswith(BODY.encode())
    assert int(headers["content-length"]) == len(sent)


def test_a_client_that_takes_no_gzip_gets_the_body_as_it_is():
    headers, sent = _raw(TestClient(_app()), "/whole", encoding="identity")
    assert "content-encoding" not in headers and sent == BODY.encode()
