"""Flow control: named limits (``/limits``) and queue settings (``/queues/{name}``).
Domain in service.flow; docs/flow-control.md."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse

from service import errors, flow
from service.auth import Principal
from service.gate import BodyKind
from service.routers.deps import GuardedRoute, get_principal, get_runtime, require
from service.routers.problems import PROBLEMS
from service.runtime import Runtime
from service.schemas import (
    LIMIT_PATTERN,
    NAME_PATTERN,
    Limit,
    LimitList,
    LimitSpec,
    QueuePatch,
    QueueView,
)

router = APIRouter(route_class=GuardedRoute, tags=["flow control"])
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]


def _limit_name(name: str) -> str:
    if not re.fullmatch(LIMIT_PATTERN, name):
        raise errors.ValidationFailed(
            f"a limit name is 1-128 of A-Z a-z 0-9 _ . : - (a pattern ends in *): {name[:140]!r}"
        )
    return name


def _queue_name(name: str) -> str:
    if not re.fullmatch(NAME_PATTERN, name):
        raise errors.ValidationFailed(
            f"a queue name is 1-128 of A-Z a-z 0-9 _ . : -: {name[:140]!r}"
        )
    return name


def _unrestricted(principal: Principal) -> None:
    """Limits span queues, so only a key without queue patterns changes them."""
    if principal.queues is not None:
        raise errors.Forbidden("only an API key without queue patterns may change limits")


@router.put(
    "/limits/{name}",
    response_model=Limit,
    responses=PROBLEMS,
    dependencies=[Depends(require("admin", BodyKind.control))],
    summary="Create or replace a limit; a name ending in * sets defaults for its matches",
)
async def put_limit(
    name: str, spec: LimitSpec, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse:
    _unrestricted(principal)
    name, now = _limit_name(name), runtime.clock.now()
    body = await runtime.db.run(lambda s: flow.put_limit(s, name, spec, now))
    await flow.sync_redis(runtime)
    return JSONResponse(body)


@router.get(
    "/limits",
    response_model=LimitList,
    responses=PROBLEMS,
    dependencies=[Depends(require("read"))],
    summary="List limits and patterns by name, with the slots each holds now",
)
async def list_limits(runtime: RuntimeDep) -> JSONResponse:
    return JSONResponse({"limits": await runtime.db.read(flow.list_limits)})


@router.get(
    "/limits/{name}",
    response_model=Limit,
    responses=PROBLEMS,
    dependencies=[Depends(require("read"))],
    summary="Read a limit",
)
async def get_limit(name: str, runtime: RuntimeDep) -> JSONResponse:
    name = _limit_name(name)
    return JSONResponse(await runtime.db.read(lambda s: flow.get_limit(s, name)))


@router.delete(
    "/limits/{name}",
    status_code=204,
    responses=PROBLEMS,
    dependencies=[Depends(require("admin"))],
    summary="Delete a limit (its jobs run unlimited, or under a matching pattern)",
)
async def delete_limit(name: str, runtime: RuntimeDep, principal: PrincipalDep) -> Response:
    _unrestricted(principal)
    name = _limit_name(name)
    await runtime.db.run(lambda s: flow.delete_limit(s, name))
    await flow.sync_redis(runtime)
    return Response(status_code=204)


@router.get(
    "/queues/{name}",
    response_model=QueueView,
    responses=PROBLEMS,
    dependencies=[Depends(require("read"))],
    summary="A queue's settings (paused, limits) and counts",
)
async def get_queue(name: str, runtime: RuntimeDep, principal: PrincipalDep) -> JSONResponse:
    principal.check_queue(_queue_name(name))
    return JSONResponse(await runtime.db.read(lambda s: flow.queue_body(s, name)))


@router.patch(
    "/queues/{name}",
    response_model=QueueView,
    responses=PROBLEMS,
    dependencies=[Depends(require("admin", BodyKind.control))],
    summary="Pause or resume a queue, set or clear its max_running and rate",
)
async def patch_queue(
    name: str, patch: QueuePatch, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse:
    principal.check_queue(_queue_name(name))
    return JSONResponse(await flow.set_queue(runtime, name, patch))
