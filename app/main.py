"""create_app(): the ASGI app, with its routers and static files."""

from pathlib import Path

from fastapi import FastAPI

from app import schemas, server
from app.api import broadcast, bugs, docs, export, pages, program, run, train
from app.engine import data
from app.ops import meta_kernels
from app.programs.schemas import ProgramRequest, ProgramTrainRequest
from app.sandbox.allocator import release_memory
from app.server import assets
from app.server.compression import GZipMiddleware
from app.server.timing import ServerTimingMiddleware
from app.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parent.parent


def warm_up() -> None:
    """Pay torch's and the meta tracer's first-call costs (~1 s) at startup, not on the first
    request; and cache the article's trace."""
    from app.runs import pipeline

    small = schemas.RunRequest(batch=2, in_features=3, hidden=[4], max_cells=16)
    pipeline.run(small, 1 << 16)
    pipeline.trace(schemas.RunRequest())


def create_app(settings: Settings | None = None) -> FastAPI:
    """`settings`: the server's limits (default: from BROADPROP_* environment variables)."""
    meta_kernels.use_native()  # the dry runs on C++ meta kernels (app/ops/meta_kernels.py)
    app = FastAPI(
        title="Broadprop",
        version="1.0",
        summary="Manual backprop with tensor broadcasting, checked against torch.autograd.",
        docs_url=None,  # served by app.api.docs from local assets (no CDN)
        redoc_url=None,
    )
    # the program routes read their bodies as bytes (a sandbox worker validates them)
    server.install(app, settings or get_settings(), models=schemas, warm_up=warm_up,
                   body_models=(ProgramRequest, ProgramTrainRequest))  # fmt: skip
    # compresses JSON and HTML over 1 KB (the page's article run: 462 KB of JSON to ~160 KB),
    # through ISA-L where installed: ~4x zlib's speed at its fastest level
    # (app/server/compression.py)
    app.add_middleware(GZipMiddleware, minimum_size=1024)
    # outermost: the server's share of a wait, compression included, for the browser
    app.add_middleware(ServerTimingMiddleware)
    # the shipped datasets, parsed in a background thread (once per process); the parse's
    # temporaries (~100 MB for MNIST's text) are free but still held by that thread's malloc
    # arena (the trim threshold is high), so the thread hands them back
    data.warm(after=release_memory)
    assets.warm()  # the Plotly bundle's gzip, made once in the background
    app.mount("/static", assets.VersionedStatic(directory=ROOT / "static"), name="static")
    for module in (run, train, program, broadcast, bugs, export, pages, docs):
        app.include_router(module.router)

    @app.get("/healthz", tags=["meta"])
    async def healthz() -> dict[str, str]:  # async: answers on the event loop during load
        return {"status": "ok"}

    return app


app = create_app()
