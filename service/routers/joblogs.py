"""A job's per-attempt logs (issue 16; docs/operations.md, "Per-attempt job logs")."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from service import joblogs
from service.auth import Principal
from service.routers.deps import GuardedRoute, get_principal, get_runtime, require
from service.routers.problems import PROBLEMS
from service.runtime import Runtime
from service.schemas import JobLogs

router = APIRouter(route_class=GuardedRoute, tags=["jobs"])


@router.get(
    "/jobs/{job_id}/logs",
    response_model=JobLogs,
    responses=PROBLEMS,
    dependencies=[Depends(require("read"))],
    summary="What the task logged, per attempt",
)
async def get_logs(
    job_id: str,
    runtime: Annotated[Runtime, Depends(get_runtime)],
    principal: Annotated[Principal, Depends(get_principal)],
) -> JobLogs:
    attempts = await runtime.db.read(lambda session: joblogs.read(session, job_id, principal))
    return JobLogs.model_validate({"id": job_id, "attempts": attempts})
