"""Shared router dependencies: the runtime, scope checks, size limits."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from service.auth import Principal
from service.gate import BodyKind, GuardedRoute, require
from service.http_server import peer_has_closed
from service.runtime import Runtime
from service.startup import starting
from service.submit import check_payload

__all__ = ["BodyKind", "GuardedRoute", "get_principal", "get_runtime", "require"]


# Dependencies are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in the
# thread pool, a thread hop per request for what is a dictionary lookup.
async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    if not runtime.started:  # the database has not answered yet (service/startup.py)
        raise starting(runtime)
    return runtime


async def get_principal(request: Request) -> Principal:
    """The caller, as the gate authenticated it (service.gate)."""
    principal: Principal = request.state.principal
    return principal


def content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def check_payload_size(request: Request, what: str, *values: Any) -> None:
    """Enforce the per-job JSON size limit (``service.submit.check_payload``)."""
    limit = request.app.state.runtime.settings.max_payload_bytes
    check_payload(limit, content_length(request), what, *values)


async def until_client_leaves(request: Request) -> None:
    """Return when the client has gone: disconnected, or closed its half of the
    connection (whose answer, if any, still reaches it: service/http_server.py). For a
    handler that has read its body: nothing else is read."""
    while not peer_has_closed(request.scope):
        if (await request.receive())["type"] == "http.disconnect":
            return


async def client_has_left(request: Request) -> bool:
    """``until_client_leaves`` without waiting."""
    return peer_has_closed(request.scope) or await request.is_disconnected()
