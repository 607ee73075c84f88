"""Webhook deliveries of a job: list them with their attempts, and deliver again."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from sqlalchemy.orm import Session

from service import jobs, webhooks
from service.auth import Principal
from service.leases import Effects
from service.routers.deps import GuardedRoute, get_principal, get_runtime, require
from service.routers.problems import PROBLEMS
from service.runtime import Runtime
from service.schemas import Delivery, DeliveryList
from service.serialize import JSONResponse

router = APIRouter(route_class=GuardedRoute, tags=["webhooks"])
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
# Another tenant's job is not found (docs/security.md).
PrincipalDep = Annotated[Principal, Depends(get_principal)]


@router.get(
    "/jobs/{job_id}/deliveries",
    response_model=DeliveryList,
    responses=PROBLEMS,
    dependencies=[Depends(require("read"))],
    summary="A job's webhook deliveries, each with its attempts",
)
async def list_deliveries(
    job_id: str, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse:
    def work(session: Session) -> list[dict[str, Any]]:
        jobs.check_visible(session, job_id, principal)
        return webhooks.list_deliveries(session, job_id)

    found = await runtime.db.read(work)
    return JSONResponse({"deliveries": found})


@router.post(
    "/jobs/{job_id}/deliveries/redeliver",
    status_code=202,
    response_model=Delivery,
    responses=PROBLEMS,
    dependencies=[Depends(require("admin"))],
    summary="Queue a new delivery (new webhook-id) of a finished job's event, due now",
)
async def redeliver(job_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> JSONResponse:
    now = runtime.clock.now()

    def work(session: Session, effects: Effects) -> dict[str, Any]:
        jobs.check_visible(session, job_id, principal)
        return webhooks.redeliver(session, job_id, now, effects)

    delivery = await runtime.transact(work)
    return JSONResponse(delivery, status_code=202)
