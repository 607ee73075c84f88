"""Workflows: jobs with dependencies, submitted together (docs/workflows.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from service import workflow_requests
from service.auth import Principal
from service.routers.deps import (
    BodyKind,
    GuardedRoute,
    content_length,
    get_principal,
    get_runtime,
    require,
)
from service.routers.problems import PROBLEMS
from service.runtime import Runtime
from service.serialize import JSONResponse
from service.states import JobStatus, WorkflowStatus
from service.workflows import WorkflowSubmit

router = APIRouter(route_class=GuardedRoute, tags=["workflows"])
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]


class WorkflowJob(BaseModel):
    ref: str
    id: str
    status: JobStatus
    task: str | None = None
    result: Any = Field(None, description="its result, once it succeeded")
    error: Any = Field(None, description="why it failed or was cancelled")
    finished_at: datetime | None = None


class Workflow(BaseModel):
    id: str
    status: WorkflowStatus
    on_failure: str
    created_at: datetime
    finished_at: datetime | None
    jobs: list[WorkflowJob] = Field(description="in the submitted order")


@router.post(
    "/workflows",
    status_code=202,
    response_model=Workflow,
    responses=PROBLEMS,
    dependencies=[Depends(require("submit", BodyKind.batch))],
    summary="Submit jobs with dependencies between them, in one transaction",
    description="A job with `after` waits (status `waiting`) until every job it names has "
    "succeeded, then is queued; its lease carries `parents` (ref → result) and "
    "`parent_status` (ref → status). A cycle, an unknown or repeated ref is a 422 naming "
    "it. At most CELERIAC_MAX_WORKFLOW_JOBS jobs (20,000).",
)
async def submit_workflow(
    spec: WorkflowSubmit, request: Request, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse:
    body = await workflow_requests.create(runtime, principal, spec, content_length(request))
    return JSONResponse(body, status_code=202, headers={"Location": f"/workflows/{body['id']}"})


@router.get(
    "/workflows/{workflow_id}",
    response_model=Workflow,
    responses=PROBLEMS,
    dependencies=[Depends(require("read"))],
    summary="A workflow's status and each of its jobs",
)
async def get_workflow(
    workflow_id: str, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse:
    return JSONResponse(await workflow_requests.get(runtime, principal, workflow_id))


@router.post(
    "/workflows/{workflow_id}/cancel",
    response_model=Workflow,
    responses=PROBLEMS,
    dependencies=[Depends(require("submit"))],
    summary="Cancel what has not finished (a running job is told at its next heartbeat)",
)
async def cancel_workflow(
    workflow_id: str, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse:
    return JSONResponse(await workflow_requests.cancel(runtime, principal, workflow_id))
