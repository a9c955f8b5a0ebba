"""``GET /docs``: the OpenAPI explorer, with every asset served by this server.

FastAPI's built-in page loads Swagger UI from a CDN, which a line network may not reach
and which would run third-party script beside the API keys typed into it. The assets
come from the ``swagger-ui-bundle`` package instead, under ``/docs-assets``.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from swagger_ui_bundle import swagger_ui_path

from service.api.static_files import AllowListedFiles

ASSETS = "/docs-assets"


# Only what the page loads: the bundle also holds Swagger's demo page, which fetches the
# petstore example's spec and a validator from swagger.io into this origin.
ASSET_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")


def install_docs(app: FastAPI) -> None:
    app.mount(ASSETS, AllowListedFiles(directory=str(swagger_ui_path), names=ASSET_FILES), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - API",
                                   swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS}/favicon-32x32.png")
