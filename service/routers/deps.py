"""Shared router dependencies: the runtime, scope checks, size limits."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from service import errors
from service.auth import Principal
from service.gate import BodyKind, GuardedRoute, require
from service.runtime import Runtime
from service.startup import starting

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
    """Enforce the per-job (or per-result) JSON size limit. The request's own length is
    an upper bound, so the common small request costs no extra serialisation."""
    limit = request.app.state.runtime.settings.max_payload_bytes
    length = content_length(request)
    if length is not None and length <= limit:
        return
    size = sum(len(json.dumps(v, separators=(",", ":"))) for v in values)
    if size > limit:
        raise errors.PayloadTooLarge(
            f"{what} is {size} bytes of JSON; the limit is {limit} "
            "(CELERIAC_MAX_PAYLOAD_BYTES). Store large inputs elsewhere and pass a reference."
        )
