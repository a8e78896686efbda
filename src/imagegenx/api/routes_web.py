"""The browser page: ``/`` serves ``index.html``, ``/web/...`` its CSS and ES modules.

Plain files shipped in the package (``imagegenx/web``), no build step. They need no API key: the
page asks for one and sends it with every API call it makes.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

router = APIRouter(include_in_schema=False)

# Only our own scripts and styles; images come from the API as blobs (fetched with the key).
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def web_dir() -> Path:
    return Path(str(files("imagegenx") / "web"))


@router.api_route("/", methods=["GET", "HEAD"])
def index() -> FileResponse:
    return FileResponse(
        web_dir() / "index.html",
        media_type="text/html",
        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"},
    )


def install(app: FastAPI) -> None:
    """Add the page and its static files to ``app``."""
    app.include_router(router)
    app.mount("/web", StaticFiles(directory=web_dir()), name="web")
