"""create_app(): the ASGI app, with its routers and static files."""

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from app import data, hardening
from app.api import broadcast, bugs, docs, export, pages, run, train
from app.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parent.parent


def create_app(settings: Settings | None = None) -> FastAPI:
    """`settings`: the server's limits (default: from BROADPROP_* environment variables)."""
    app = FastAPI(
        title="Broadprop",
        version="1.0",
        summary="Manual backprop with tensor broadcasting, checked against torch.autograd.",
        docs_url=None,  # served by app.api.docs from local assets (no CDN)
        redoc_url=None,
    )
    hardening.install(app, settings or get_settings())
    data.warm()  # the shipped datasets, parsed in a background thread (once per process)
    app.mount("/static", StaticFiles(directory=ROOT / "static"), name="static")
    for module in (run, train, broadcast, bugs, export, pages, docs):
        app.include_router(module.router)

    @app.get("/healthz", tags=["meta"])
    async def healthz() -> dict[str, str]:  # async: answers on the event loop during load
        return {"status": "ok"}

    return app


app = create_app()
