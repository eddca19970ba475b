"""The agent console: static pages served by the gateway at ``/console/`` (no CDN, no build).

Every file of this directory whose name is on the allow-list below (a plain name, one of
the listed extensions) is served with its content type; anything else (this module, a
path with a slash or dots, a missing file) is 404. HTML pages get a strict
Content-Security-Policy: scripts, styles and sockets from this origin only, no inline
script or style, never framed. The pages talk to the agent API (``/api/v1``, session
cookie + ``X-CSRF-Token``) and its live socket (``/api/v1/live``, docs/console-protocol.md).
"""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

HERE = Path(__file__).resolve().parent
CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\.(?:html|js|css|svg)$")
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; object-src 'none'; "
    "frame-ancestors 'none'"
)


def _headers(suffix: str) -> dict[str, str]:
    headers = {
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    if suffix in (".html", ".svg"):
        headers["Content-Security-Policy"] = CSP
        headers["X-Frame-Options"] = "DENY"
    return headers


def console_file(name: str) -> Path | None:
    """The file to serve for ``name``, if it is on the allow-list and exists."""
    if not NAME.fullmatch(name):
        return None
    path = HERE / name
    return path if path.is_file() else None


async def serve(request: web.Request) -> web.StreamResponse:
    name = request.match_info.get("name") or "index.html"
    path = console_file(name)
    if path is None:
        raise web.HTTPNotFound(text="no such console file")
    return web.Response(
        body=path.read_bytes(),
        content_type=CONTENT_TYPES[path.suffix],
        charset="utf-8",
        headers=_headers(path.suffix),
    )


async def to_index(_request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/console/")


def setup_console(app: web.Application) -> None:
    """``/console`` (redirect), ``/console/`` (the console) and ``/console/<file>``."""
    app.router.add_get("/console", to_index)
    app.router.add_get("/console/", serve)
    app.router.add_get("/console/{name}", serve)
