"""The web page at `/`: pick, drop or photograph an image, see the service's detections drawn on it.

Plain HTML, JavaScript and CSS shipped as package data (`m2det/serve/static/`): no CDN, no build
step. The page only uses the service's own routes (`GET /model`, `POST /detect`) through relative
URLs, so it keeps working behind a path prefix; an API key typed into it is sent as `X-API-Key`.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import HTMLResponse, Response

# the page's files, by the name it asks for them under /page/, with their media types
ASSETS = {
    "page.js": "text/javascript; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
}


def read_asset(name: str) -> str:
    return files("m2det.serve").joinpath("static").joinpath(name).read_text(encoding="utf-8")


def page_router() -> APIRouter:
    """`GET /` (the page) and `GET /page/{name}` (its script and style sheet), left out of the OpenAPI schema."""
    router = APIRouter(include_in_schema=False)

    @router.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(read_asset("index.html"), headers={"Cache-Control": "no-cache"})

    @router.get("/page/{name}")
    def asset(name: str) -> Response:
        if name not in ASSETS:
            raise HTTPException(404, f"no page file {name!r}")
        return Response(read_asset(name), media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})

    return router


def mount_page(app: FastAPI) -> None:
    """Serve the web page from `app` (at `/`, its files under `/page/`)."""
    app.include_router(page_router())
