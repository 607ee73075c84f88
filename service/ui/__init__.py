"""The dashboard at ``/ui`` (issue 17; docs/dashboard.md).

A page of plain HTML, CSS and one JavaScript module, shipped in this package and served
by ``celeriac serve``: no build step, no CDN, nothing fetched from elsewhere. The page
reads and acts through the same JSON API every client uses (``/jobs``, ``/workers``,
``/schedules``, …), so the dashboard can do nothing a key could not do with curl, and
the API's scopes decide what it may do. It adds three things of its own:

- a log-in that keeps the key in an HttpOnly, SameSite=Strict cookie, accepted only
  with the ``X-Celeriac-UI`` header (``service.auth``: CSRF-safe without tokens);
- ``GET /ui/session``: which scopes the key has, so buttons it may not use are disabled;
- ``GET /ui/overview``: queue counts and the last hour's throughput, cached a few
  seconds per process so that open dashboards cost the database nothing more on a
  table of millions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import Field

from service import errors
from service.auth import UI_COOKIE, Principal, match_key
from service.routers.deps import GuardedRoute, get_principal, get_runtime, require
from service.runtime import Runtime
from service.schemas import Strict
from service.ui.overview import Overview

__all__ = ["Overview", "router"]

STATIC = Path(__file__).parent / "static"
# Every file the page loads: nothing else under /ui/static is served.
ASSETS = {
    "ui.js": "text/javascript; charset=utf-8",
    "ui.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# The page runs only its own script and style; nothing may frame it.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
COOKIE_SECONDS = 12 * 3600

router = APIRouter(route_class=GuardedRoute, include_in_schema=False, tags=["dashboard"])
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


class Login(Strict):
    key: Annotated[str, Field(min_length=1, max_length=1024)]


@router.get("/ui")
async def page() -> Response:
    return FileResponse(
        STATIC / "index.html",
        media_type="text/html; charset=utf-8",
        headers={**SECURITY_HEADERS, "Cache-Control": "no-store"},
    )


@router.get("/ui/static/{name}")
async def asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise errors.NotFound(f"no dashboard asset {name!r}")
    return FileResponse(
        STATIC / name,
        media_type=media_type,
        headers={**SECURITY_HEADERS, "Cache-Control": "public, max-age=300"},
    )


@router.post("/ui/login", status_code=204)
async def login(body: Login, request: Request, runtime: RuntimeDep) -> Response:
    """Keep a valid key in the cookie; 401 for any other (the key is never logged)."""
    keys = runtime.settings.parsed_api_keys
    if keys and match_key(keys, body.key) is None:
        raise errors.Unauthorized("that is not an API key of this service")
    response = Response(status_code=204)
    if keys:
        response.set_cookie(
            UI_COOKIE,
            quote(body.key, safe=""),
            max_age=COOKIE_SECONDS,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
    return response


@router.post("/ui/logout", status_code=204)
async def logout() -> Response:
    response = Response(status_code=204)
    response.delete_cookie(UI_COOKIE, path="/", httponly=True, samesite="strict")
    return response


@router.get("/ui/session", dependencies=[Depends(require("read"))])
async def session(
    runtime: RuntimeDep, principal: Annotated[Principal, Depends(get_principal)]
) -> JSONResponse:
    """Who the dashboard acts as: 401 (log in) when keys are set and none was given."""
    admin = principal.has("admin")
    return JSONResponse(
        {
            "auth": bool(runtime.settings.parsed_api_keys),
            "key_id": principal.key_id,
            "scopes": sorted(principal.scopes),
            "can_act": admin,
            "queues": None if principal.queues is None else list(principal.queues),
        }
    )


@router.get("/ui/overview", dependencies=[Depends(require("read"))])
async def overview(
    request: Request, runtime: RuntimeDep, principal: Annotated[Principal, Depends(get_principal)]
) -> JSONResponse:
    cache: Overview = request.app.state.ui_overview
    body: dict[str, Any] = await cache.read(runtime, principal)
    return JSONResponse(body, headers={"Cache-Control": "no-store"})
