"""API docs that work offline: Swagger UI at /docs and ReDoc at /redoc from files installed with the
package `fastapi-offline` (FastAPI's defaults load them from a CDN and are blank without internet).

Use with `FastAPI(docs_url=None, redoc_url=None)`, then `add_offline_docs(app)`. Each docs page has its
own Content-Security-Policy (security.docs_csp: its inline script by hash, inline styles), stricter
than none but looser than the page's."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from .security import docs_csp

ASSETS = Path(fastapi_offline.__file__).parent / "static"  # swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js
FAVICON = Path(__file__).parent / "static" / "favicon.svg"


def _with_csp(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = docs_csp(page.body.decode())
    return page


def add_offline_docs(app: FastAPI, assets_url: str = "/docs-assets") -> None:
    redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"
    app.mount(assets_url, StaticFiles(directory=ASSETS), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _with_csp(get_swagger_ui_html(
            openapi_url=root + app.openapi_url, title=app.title + " — REST API",
            oauth2_redirect_url=root + redirect_url,
            swagger_js_url=f"{root}{assets_url}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{assets_url}/swagger-ui.css",
            swagger_favicon_url=root + "/favicon.ico",
            # no badge from the online validator: nothing on the page leaves this machine
            swagger_ui_parameters={"validatorUrl": None, **(app.swagger_ui_parameters or {})}))

    @app.get(redirect_url, include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return _with_csp(get_swagger_ui_oauth2_redirect_html())

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _with_csp(get_redoc_html(openapi_url=root + app.openapi_url, title=app.title + " — REST API",
                                        redoc_js_url=f"{root}{assets_url}/redoc.standalone.js",
                                        redoc_favicon_url=root + "/favicon.ico", with_google_fonts=False))

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        return FileResponse(FAVICON, media_type="image/svg+xml")
