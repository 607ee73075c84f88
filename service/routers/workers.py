"""The worker registry (domain in service.workers): workers register and heartbeat with the
``work`` scope, anyone with ``read`` lists them, an administrator quiets or stops them.
A registration belongs to the API key that made it (docs/security.md)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from sqlalchemy.orm import Session

from service import workers
from service.auth import Principal
from service.routers.deps import BodyKind, GuardedRoute, get_principal, get_runtime, require
from service.routers.problems import PROBLEMS
from service.runtime import Runtime
from service.schemas import (
    Worker,
    WorkerHeartbeat,
    WorkerHeartbeatResponse,
    WorkerList,
    WorkerRegister,
    WorkerRegistered,
)
from service.serialize import JSONResponse

router = APIRouter(route_class=GuardedRoute, tags=["workers"])
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
WORK = [Depends(require("work"))]
# A heartbeat lists the jobs in hand: up to a few thousand ids.
WORK_REPORT = [Depends(require("work", BodyKind.report))]
ADMIN = [Depends(require("admin"))]


def _interval(runtime: Runtime) -> float:
    return runtime.settings.worker_heartbeat_seconds


@router.post(
    "/workers",
    status_code=201,
    response_model=WorkerRegistered,
    responses=PROBLEMS,
    dependencies=WORK,
    summary="Register a worker process",
)
async def register(
    spec: WorkerRegister, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse:
    now, interval = runtime.clock.now(), _interval(runtime)
    worker_id = await runtime.db.run(
        lambda session: workers.register(session, spec, principal, now, interval)
    )
    # The deadline moved: let the maintenance loop re-plan its sleep.
    runtime.signals.maintenance.set()
    body = {"id": worker_id, "heartbeat_interval": interval}
    return JSONResponse(body, status_code=201, headers={"Location": f"/workers/{worker_id}"})


@router.post(
    "/workers/{worker_id}/heartbeat",
    response_model=WorkerHeartbeatResponse,
    responses=PROBLEMS,
    dependencies=WORK_REPORT,
    summary="Say the worker is alive; the answer carries a command for it, if any",
)
async def heartbeat(
    worker_id: str, body: WorkerHeartbeat, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse:
    now, interval = runtime.clock.now(), _interval(runtime)
    key_id = principal.key_id
    command = await runtime.db.run(
        lambda session: workers.heartbeat(session, worker_id, key_id, body.running, now, interval)
    )
    return JSONResponse({"command": command})


@router.delete(
    "/workers/{worker_id}",
    status_code=204,
    response_class=Response,
    responses=PROBLEMS,
    dependencies=WORK,
    summary="Deregister a worker that shut down cleanly",
)
async def deregister(worker_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> Response:
    key_id = principal.key_id
    await runtime.db.run(lambda session: workers.deregister(session, worker_id, key_id))
    return Response(status_code=204)


@router.get(
    "/workers",
    response_model=WorkerList,
    responses=PROBLEMS,
    dependencies=[Depends(require("read"))],
    summary="Live workers, and lost ones for CELERIAC_WORKER_LOST_RETENTION_SECONDS",
)
async def list_workers(runtime: RuntimeDep, principal: PrincipalDep) -> JSONResponse:
    rows = await runtime.db.read(lambda session: workers.list_workers(session, principal))
    now = runtime.clock.now()
    return JSONResponse({"workers": [workers.worker_body(row, now) for row in rows]})


async def _command(
    runtime: Runtime, worker_id: str, command: str, principal: Principal
) -> JSONResponse:
    def work(session: Session) -> dict[str, Any]:
        return workers.send_command(session, worker_id, command, principal)

    row = await runtime.db.run(work)
    return JSONResponse(workers.worker_body(row, runtime.clock.now()))


@router.post(
    "/workers/{worker_id}/quiet",
    response_model=Worker,
    responses=PROBLEMS,
    dependencies=ADMIN,
    summary="Tell a worker to stop leasing jobs (at its next heartbeat)",
)
async def quiet(worker_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> JSONResponse:
    return await _command(runtime, worker_id, "quiet", principal)


@router.post(
    "/workers/{worker_id}/shutdown",
    response_model=Worker,
    responses=PROBLEMS,
    dependencies=ADMIN,
    summary="Tell a worker to finish its running jobs and exit (warm shutdown)",
)
async def shutdown(worker_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> JSONResponse:
    return await _command(runtime, worker_id, "shutdown", principal)
