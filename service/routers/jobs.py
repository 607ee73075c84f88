"""Jobs: submit, read, list, cancel, retry."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse

from service import job_commands, jobs, results, submit, waiting
from service.auth import Principal
from service.longpoll import RETRY_AFTER
from service.routers.deps import (
    BodyKind,
    GuardedRoute,
    content_length,
    get_principal,
    get_runtime,
    require,
)
from service.routers.problems import PROBLEMS, SUBMIT
from service.runtime import Runtime
from service.schemas import (
    IDEMPOTENCY_KEY_PATTERN,
    Job,
    JobBatchResult,
    JobBatchSubmit,
    JobPage,
    JobStatus,
    JobSubmit,
)
from service.serialize import job_body, values_body

router = APIRouter(route_class=GuardedRoute, tags=["jobs"])
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
# Who is calling: its queue patterns and its idempotency keys (docs/security.md).
PrincipalDep = Annotated[Principal, Depends(get_principal)]


@router.post(
    "/jobs",
    status_code=202,
    response_model=Job,
    responses=SUBMIT,
    dependencies=[Depends(require("submit", BodyKind.job))],
    summary="Submit a job",
)
async def submit_job(
    spec: JobSubmit,
    request: Request,
    runtime: RuntimeDep,
    principal: PrincipalDep,
    idempotency_key: Annotated[
        str | None, Header(max_length=255, pattern=IDEMPOTENCY_KEY_PATTERN)
    ] = None,
) -> JSONResponse:
    length = content_length(request)
    done = await submit.submit_one(runtime, principal, spec, idempotency_key, length)
    headers = {"Location": f"/jobs/{done.row['id']}"}
    if done.replayed:
        headers["Idempotent-Replayed"] = "true"
    status = 200 if done.replayed else 202
    return JSONResponse(values_body(done.row), status_code=status, headers=headers)


@router.post(
    "/jobs/batch",
    status_code=202,
    response_model=JobBatchResult,
    responses=PROBLEMS,
    dependencies=[Depends(require("submit", BodyKind.batch))],
    summary="Submit up to max_batch_jobs jobs in one transaction",
)
async def submit_batch(
    batch: JobBatchSubmit, request: Request, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse:
    length = content_length(request)
    rows = await submit.submit_batch(runtime, principal, batch.jobs, length)
    return JSONResponse({"jobs": [values_body(row) for row in rows]}, status_code=202)


@router.get(
    "/jobs/{job_id}",
    response_model=Job,
    responses=PROBLEMS,
    dependencies=[Depends(require("read"))],
    summary="Read a job; ?wait=S holds the request until it finishes",
)
async def get_job(
    job_id: str,
    runtime: RuntimeDep,
    principal: PrincipalDep,
    wait: Annotated[float, Query(ge=0, le=60)] = 0,
) -> JSONResponse:
    found = await waiting.read_job(runtime, principal, job_id, wait)
    # A result kept in the result store is read back into the body.
    body = await results.inline_stored(runtime, found.row, job_body(found.row))
    return JSONResponse(body, headers=RETRY_AFTER if found.refused else None)


@router.get(
    "/jobs",
    response_model=JobPage,
    responses=PROBLEMS,
    dependencies=[Depends(require("read"))],
    summary="List jobs, newest first",
)
async def list_jobs(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    status: JobStatus | None = None,
    queue: Annotated[str | None, Query(max_length=128)] = None,
    task: Annotated[str | None, Query(max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> JSONResponse:
    rows, next_cursor = await runtime.db.read(
        lambda session: jobs.list_jobs(
            session,
            status=status,
            queue=queue,
            task=task,
            limit=limit,
            cursor=cursor,
            principal=principal,
        )
    )
    return JSONResponse({"jobs": [job_body(row) for row in rows], "next_cursor": next_cursor})


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=Job,
    responses=PROBLEMS,
    dependencies=[Depends(require("admin"))],
    summary="Cancel a job (a running one is told at its next heartbeat)",
)
async def cancel_job(job_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> JSONResponse:
    return JSONResponse(job_body(await job_commands.cancel(runtime, principal, job_id)))


@router.post(
    "/jobs/{job_id}/retry",
    response_model=Job,
    responses=PROBLEMS,
    dependencies=[Depends(require("admin"))],
    summary="Queue a failed, cancelled or expired job again",
)
async def retry_job(job_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> JSONResponse:
    return JSONResponse(job_body(await job_commands.retry(runtime, principal, job_id)))
