"""The API's description and its pages: `/openapi.json`, `/docs` (Swagger UI) and `/redoc`, the
pages served from an installed package, not a CDN, so that they work offline. All three are
declared routes (the app is made with `openapi_url=None, docs_url=None, redoc_url=None`), so the
request log and metrics name them as they name every route.

The files come from `fastapi-offline`, which vendors Swagger UI 5 and ReDoc; only its static files
are used (its app factory makes a plain `FastAPI`, and ours is `LedgerApp`). The other candidate,
`swagger-ui-bundle`, ships Swagger UI 4, which cannot render the OpenAPI 3.1 that FastAPI writes.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse, JSONResponse

STATIC = Path(fastapi_offline.__file__).parent / "static"
STATIC_URL = "/docs/static"
OPENAPI_URL = "/openapi.json"


def install(app: FastAPI) -> None:
    """Serve the description, the two pages and their files."""
    app.mount(STATIC_URL, StaticFiles(directory=STATIC), name="docs-static")

    @app.get(OPENAPI_URL, include_in_schema=False)
    async def openapi_document() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{OPENAPI_URL}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC_URL}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{OPENAPI_URL}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{STATIC_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{STATIC_URL}/favicon.png",
            with_google_fonts=False,
        )
