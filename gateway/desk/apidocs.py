"""``GET /api/docs``: the agent API's reference, Swagger UI over the generated OpenAPI
(``/api/openapi.json``, gateway/desk/openapi.py).

Swagger UI's own files come from the swagger-ui-py package (its static directory; the
package is not imported, so none of its framework glue runs) and are served from
``/api/docs/assets/``: nothing from a CDN, the page works offline, and it keeps a strict
Content-Security-Policy (no inline script: the page's settings are ``docs.js``). Swagger
UI's call to the public spec validator is off (``validatorUrl: null``).
"""

from __future__ import annotations

import html
import importlib.util
from functools import cache
from pathlib import Path

from aiohttp import web

from gateway.desk.openapi import Endpoint
from gateway.store import NotFound

TITLE = "Omnigate agent API"
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Swagger UI's files the page uses (from the package), by their content type.
SWAGGER_FILES = {
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "favicon-32x32.png": "image/png",
}
# The page's own settings for Swagger UI (relative URLs: the page may sit behind a prefix).
SETTINGS_JS = """\
"use strict";
window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
  deepLinking: true,
  displayRequestDuration: true,
  validatorUrl: null,
});
"""
PAGE = f"""\
<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>{html.escape(TITLE)}</title>
  <link rel="icon" type="image/png" href="docs/assets/favicon-32x32.png">
  <link rel="stylesheet" href="docs/assets/swagger-ui.css">
</head>
<body>
  <noscript>This page needs JavaScript. The API's description is
    <a href="openapi.json">/api/openapi.json</a>.</noscript>
  <div id="swagger-ui"></div>
  <script src="docs/assets/swagger-ui-bundle.js"></script>
  <script src="docs/assets/docs.js"></script>
</body>
</html>
"""


@cache
def swagger_static() -> Path:
    """swagger-ui-py's directory of Swagger UI files (found, not imported)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("swagger-ui-py is not installed (pip install swagger-ui-py)")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


async def docs_page(request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html", charset="utf-8",
                        headers={"Content-Security-Policy": PAGE_CSP,
                                 "Referrer-Policy": "no-referrer"})


async def docs_asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    cache_control = {"Cache-Control": "public, max-age=3600"}
    if name == "docs.js":
        return web.Response(text=SETTINGS_JS, content_type="text/javascript",
                            charset="utf-8", headers=cache_control)
    if name not in SWAGGER_FILES:
        raise NotFound(f"no file {name!r} here")
    return web.FileResponse(  # with ETag and Last-Modified: a reload sends nothing again
        swagger_static() / name,
        headers={"Content-Type": SWAGGER_FILES[name], **cache_control},
    )


def docs_endpoints() -> list[Endpoint]:
    return [
        Endpoint(
            "GET",
            "/docs",
            docs_page,
            "This API as a web page (Swagger UI, from /api/openapi.json)",
            None,
            errors=(),
            tag="meta",
            auth=False,
            content={"text/html": {"schema": {"type": "string"}}},
        ),
        Endpoint(
            "GET",
            "/docs/assets/{name}",
            docs_asset,
            "The docs page's script, style and icon files",
            None,
            errors=(404,),
            tag="meta",
            auth=False,
            content={"*/*": {"schema": {"type": "string", "format": "binary"}}},
        ),
    ]
