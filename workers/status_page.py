"""The operator's status page at ``/``: static HTML, script and style sheet shipped in the
package (``workers/static/``) and served as they are, with no build step.

The page fetches ``/health``, ``/metrics``, ``/api/v1/assignments`` and
``/api/v1/instances`` itself and writes what it shows as text, so a provider name or an
error text is never parsed as HTML; the Content-Security-Policy allows no inline script
either, so markup that did slip into the page could not run.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).with_name("static")
PAGE = "status.html"
# What /static/ serves: the page's own files, nothing else from the directory.
ASSET_TYPES = {"status.js": "text/javascript", "status.css": "text/css"}
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    # small files: an upgraded fleet shows its new page at the next load
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()


async def status_page(request: web.Request) -> web.Response:
    return web.Response(
        body=_read(PAGE), content_type="text/html", charset="utf-8", headers=HEADERS
    )


async def status_asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    content_type = ASSET_TYPES.get(name)
    if content_type is None:
        raise web.HTTPNotFound()
    return web.Response(
        body=_read(name), content_type=content_type, charset="utf-8", headers=HEADERS
    )


def add_status_page(app: web.Application) -> None:
    """Serve the page at ``/`` and its files under ``/static/``."""
    app.router.add_get("/", status_page)
    app.router.add_get("/static/{name}", status_asset)
