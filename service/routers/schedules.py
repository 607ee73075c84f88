"""Schedules: periodic jobs by cron expression or interval (domain in service.schedules)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import errors, schedules
from service.auth import Principal
from service.models import JobValues, ScheduleRow
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
from service.serialize import values_body

router = APIRouter(route_class=GuardedRoute, tags=["schedules"])
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]


def _unrestricted(principal: Principal) -> None:
    """Schedules are service-wide, so only a key without queue patterns changes them; a
    restricted key reads those submitting to its queues (docs/security.md)."""
    if principal.queues is not None:
        raise errors.Forbidden("only an API key without queue patterns may change schedules")


def _visible(principal: Principal, row: ScheduleRow) -> bool:
    return principal.allows_queue(str(row.job.get("queue", "default")))


def _changed(runtime: Runtime) -> None:
    # This replica re-plans its sleep at once; the others see the change within
    # reconcile_interval_seconds, and any replica may fire the tick.
    runtime.signals.schedules.set()


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

    def work(session: Session) -> ScheduleRow:
        return schedules.create_schedule(session, spec, runtime.clock.now())

    try:
        row = await runtime.db.run(work)
    except IntegrityError:  # a concurrent create of the same name committed first
        raise errors.ScheduleExists(f"a schedule named {spec.name!r} exists") from None
    _changed(runtime)
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
    rows = await runtime.db.read(schedules.list_schedules)
    shown = [schedules.schedule_body(row) for row in rows if _visible(principal, row)]
    return JSONResponse({"schedules": shown})


@router.get(
    "/schedules/{name}",
    response_model=Schedule,
    responses=PROBLEMS,
    dependencies=[Depends(require("read"))],
    summary="Read a schedule",
)
async def get_schedule(name: str, runtime: RuntimeDep, principal: PrincipalDep) -> JSONResponse:
    row = await runtime.db.read(lambda session: schedules.get_schedule(session, name))
    if not _visible(principal, row):
        raise errors.ScheduleNotFound(f"no schedule is named {name!r}")
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

    def work(session: Session) -> ScheduleRow:
        return schedules.update_schedule(session, name, update, runtime.clock.now())

    row = await runtime.db.run(work)
    _changed(runtime)
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
    await runtime.db.run(lambda session: schedules.delete_schedule(session, name))
    _changed(runtime)
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

    def work(session: Session) -> JobValues:
        return schedules.trigger_schedule(session, name, runtime.clock.now(), runtime.defaults)

    row = await runtime.db.run(work)
    await runtime.after_submit([row])
    headers = {"Location": f"/jobs/{row['id']}"}
    return JSONResponse(values_body(row), status_code=202, headers=headers)
