"""Bulk actions on the jobs a filter selects (``POST /jobs/bulk``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from service import bulk_actions
from service.auth import Principal
from service.routers.deps import GuardedRoute, get_principal, get_runtime, require
from service.routers.problems import GATE
from service.runtime import Runtime
from service.schemas import BulkRequest, BulkResult

router = APIRouter(route_class=GuardedRoute, tags=["jobs"])


@router.post(
    "/jobs/bulk",
    response_model=BulkResult,
    responses=GATE,
    dependencies=[Depends(require("admin"))],
    summary="Retry, cancel or delete every job a filter selects, in bounded batches",
    description="Each batch of up to 1000 jobs (250 for a cancel) is its own transaction, "
    "so a large match never holds the table for long; the answer comes when the last "
    "batch committed. "
    "Transitions are the one-job commands': retry queues failed, cancelled and expired "
    "jobs again; cancel cancels pending jobs and asks running ones to stop; delete "
    "deletes finished jobs with their results, webhook deliveries and logs. A filter "
    "status the action does not apply to is a 422.",
)
async def bulk_action(
    body: BulkRequest,
    runtime: Annotated[Runtime, Depends(get_runtime)],
    principal: Annotated[Principal, Depends(get_principal)],
) -> JSONResponse:
    tally = await bulk_actions.run(runtime, principal, body)
    return JSONResponse({"matched": tally.matched, "changed": tally.changed})
