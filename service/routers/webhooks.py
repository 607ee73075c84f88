"""Webhook deliveries of a job: list them with their attempts, and deliver again."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from service import webhooks
from service.routers.deps import get_runtime, require
from service.routers.jobs import PROBLEMS
from service.runtime import Runtime
from service.schemas import Delivery, DeliveryList

router = APIRouter(tags=["webhooks"])
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


@router.get(
    "/jobs/{job_id}/deliveries",
    response_model=DeliveryList,
    responses=PROBLEMS,
    dependencies=[Depends(require("read"))],
    summary="A job's webhook deliveries, each with its attempts",
)
async def list_deliveries(job_id: str, runtime: RuntimeDep) -> JSONResponse:
    found = await runtime.db.read(lambda session: webhooks.list_deliveries(session, job_id))
    return JSONResponse({"deliveries": found})


@router.post(
    "/jobs/{job_id}/deliveries/redeliver",
    status_code=202,
    response_model=Delivery,
    responses=PROBLEMS,
    dependencies=[Depends(require("admin"))],
    summary="Queue a new delivery (new webhook-id) of a finished job's event, due now",
)
async def redeliver(job_id: str, runtime: RuntimeDep) -> JSONResponse:
    now = runtime.clock.now()
    delivery = await runtime.transact(
        lambda session, effects: webhooks.redeliver(session, job_id, now, effects)
    )
    return JSONResponse(delivery, status_code=202)
