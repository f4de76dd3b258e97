"""The web chat (``/``), the operator dashboard (``/admin``) and their assets (``/static/…``), from ``clients/web/``.

The pages need no key (the APIs they call check keys). A Content-Security-Policy keeps every script, style, image and
request on this server: the pages work offline, and a stray CDN reference fails loudly in the browser.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

from litestar import Router, get
from litestar.datastructures import CacheControlHeader
from litestar.response import File
from litestar.static_files import create_static_files_router


@cache
def web_dir() -> Path:
    """``clients/web/``. find_spec locates the package without importing it (its __init__ pulls in the SDK)."""
    spec = importlib.util.find_spec("alignd.clients")
    if spec is None or spec.origin is None:
        raise RuntimeError("the clients package (with clients/web/) is not installed")
    return Path(spec.origin).parent / "web"


CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
# Revalidate every time: a server upgrade must not leave an old page talking to a new API.
_HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}


def _page(name: str) -> File:
    return File(web_dir() / name, filename=name, media_type="text/html", content_disposition_type="inline",
                headers=_HEADERS)


@get("/", include_in_schema=False)
async def chat_page() -> File:
    return _page("index.html")


@get("/admin", include_in_schema=False)
async def admin_page() -> File:
    return _page("admin.html")


def web_router() -> Router:
    """The pages and ``/static`` (a new router per app: Litestar binds a router to the app it is registered in).
    The static router resolves paths inside ``clients/web/`` only (``..`` is a 404) and guesses content types."""
    static = create_static_files_router("/static", directories=[web_dir()], cache_control=CacheControlHeader(
        no_cache=True), name="web-static")
    return Router("/", route_handlers=[chat_page, admin_page, static])
