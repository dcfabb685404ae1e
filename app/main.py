"""create_app(): the ASGI app, with its routers and static files."""

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from app.api import broadcast, docs, pages, run

ROOT = Path(__file__).resolve().parent.parent


def create_app() -> FastAPI:
    app = FastAPI(
        title="Broadprop",
        version="1.0",
        summary="Manual backprop with tensor broadcasting, checked against torch.autograd.",
        docs_url=None,  # served by app.api.docs from local assets (no CDN)
        redoc_url=None,
    )
    app.mount("/static", StaticFiles(directory=ROOT / "static"), name="static")
    for module in (run, broadcast, pages, docs):
        app.include_router(module.router)

    @app.get("/healthz", tags=["meta"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


app = create_app()
