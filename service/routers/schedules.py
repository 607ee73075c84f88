"""Schedules: periodic jobs by cron expression or interval (domain in service.schedules)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from service import errors, schedule_requests, schedules
from service.auth import Principal
from service.routers.deps import (
    GuardedRoute,
    check_payload_size,
    get_principal,
    get_runtime,
    require,
)
from service.routers.problems import PROBLEMS
from service.runtime import Runtime
from service.schemas import Job, Schedule, ScheduleCreate, ScheduleList, ScheduleUpdate
from service.serialize import JSONResponse, values_body

router = APIRouter(route_class=GuardedRoute, tags=["schedules"])
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]


def _unrestricted(principal: Principal) -> None:
    """Schedules are service-wide, so only a key without queue patterns changes them; a
    restricted key reads those submitting to its queues (docs/security.md)."""
    if principal.queues is not None:
        raise errors.Forbidden("only an API key without queue patterns may change schedules")


@router.post(
    "/schedules",
    status_code=201,
    response_model=Schedule,
    responses=PROBLEMS,
    dependencies=[Depends(require("admin"))],
    summary="Create a schedule",
)
async def create_schedule(
    spec: ScheduleCreate, request: Request, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse:
    _unrestricted(principal)
    check_payload_size(request, "job args and kwargs", spec.job.args, spec.job.kwargs)
    row = await schedule_requests.create(runtime, spec)
    headers = {"Location": f"/schedules/{row.name}"}
    return JSONResponse(schedules.schedule_body(row), status_code=201, headers=headers)


@router.get(
    "/schedules",
    response_model=ScheduleList,
    responses=PROBLEMS,
    dependencies=[Depends(require("read"))],
    summary="List schedules by name",
)
async def list_schedules(runtime: RuntimeDep, principal: PrincipalDep) -> JSONResponse:
    rows = await schedule_requests.visible_schedules(runtime, principal)
    return JSONResponse({"schedules": [schedules.schedule_body(row) for row in rows]})


@router.get(
    "/schedules/{name}",
    response_model=Schedule,
    responses=PROBLEMS,
    dependencies=[Depends(require("read"))],
    summary="Read a schedule",
)
async def get_schedule(name: str, runtime: RuntimeDep, principal: PrincipalDep) -> JSONResponse:
    row = await schedule_requests.read_schedule(runtime, principal, name)
    return JSONResponse(schedules.schedule_body(row))


@router.patch(
    "/schedules/{name}",
    response_model=Schedule,
    responses=PROBLEMS,
    dependencies=[Depends(require("admin"))],
    summary="Change a schedule; a new timing applies from the next tick",
)
async def update_schedule(
    name: str,
    update: ScheduleUpdate,
    request: Request,
    runtime: RuntimeDep,
    principal: PrincipalDep,
) -> JSONResponse:
    _unrestricted(principal)
    if update.job is not None:
        check_payload_size(request, "job args and kwargs", update.job.args, update.job.kwargs)
    row = await schedule_requests.update(runtime, name, update)
    return JSONResponse(schedules.schedule_body(row))


@router.delete(
    "/schedules/{name}",
    status_code=204,
    response_class=Response,
    responses=PROBLEMS,
    dependencies=[Depends(require("admin"))],
    summary="Delete a schedule (jobs it already submitted are kept)",
)
async def delete_schedule(name: str, runtime: RuntimeDep, principal: PrincipalDep) -> Response:
    _unrestricted(principal)
    await schedule_requests.delete(runtime, name)
    return Response(status_code=204)


@router.post(
    "/schedules/{name}/trigger",
    status_code=202,
    response_model=Job,
    responses=PROBLEMS,
    dependencies=[Depends(require("admin"))],
    summary="Submit the schedule's job now, outside its ticks",
)
async def trigger_schedule(name: str, runtime: RuntimeDep, principal: PrincipalDep) -> JSONResponse:
    _unrestricted(principal)
    row = await schedule_requests.trigger(runtime, name)
    headers = {"Location": f"/jobs/{row['id']}"}
    return JSONResponse(values_body(row), status_code=202, headers=headers)
