"""Jobs: submit, read, list, cancel, retry."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request

from service import flow, job_commands, jobs, results, submit, waiting
from service.auth import Principal
from service.idempotency import Submitted
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
    SafeDatetime,
)
from service.serialize import JSONResponse, job_body, values_body
from service.tracing import valid_traceparent

# The same bound on ``?wait=`` for reading a job and for submitting one; the service's own
# cap (CELERIAC_MAX_RESULT_WAIT_SECONDS, service/waiting.py) may shorten it further.
MAX_WAIT_QUERY = 60
router = APIRouter(route_class=GuardedRoute, tags=["jobs"])
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
# Who is calling: its queue patterns and its idempotency keys (docs/security.md).
PrincipalDep = Annotated[Principal, Depends(get_principal)]

# W3C Trace Context (docs/operations.md, Traces): stored with the job, handed out with
# its lease; a malformed value is ignored, as the W3C spec asks, never refused.
TraceparentHeader = Annotated[
    str | None,
    Header(description="W3C trace context, continued by the worker (ignored if malformed)"),
]


@router.post(
    "/jobs",
    status_code=202,
    response_model=Job,
    responses=SUBMIT,
    dependencies=[Depends(require("submit", BodyKind.job))],
    summary="Submit a job; ?wait=S then holds the request until it finishes",
    description="With `?wait=S` the job is committed as without it, then the answer waits "
    "until the job finishes or S seconds pass, as `GET /jobs/{id}?wait=S` does, and is "
    "the job at that moment (with its result when finished). The status stays 202 for a "
    "new job, even one that already succeeded, and 200 for an Idempotency-Key replay. "
    "Over a long-poll cap the job is still committed and answered at once, with "
    "`Retry-After`.",
)
async def submit_job(
    spec: JobSubmit,
    request: Request,
    runtime: RuntimeDep,
    principal: PrincipalDep,
    idempotency_key: Annotated[
        str | None, Header(max_length=255, pattern=IDEMPOTENCY_KEY_PATTERN)
    ] = None,
    wait: Annotated[float | None, Query(ge=0, le=MAX_WAIT_QUERY)] = None,
    traceparent: TraceparentHeader = None,
) -> JSONResponse:
    length = content_length(request)
    trace = valid_traceparent(traceparent)
    if wait is None:  # no read back: the row as committed
        done = await submit.submit_one(runtime, principal, spec, idempotency_key, length, trace)
        return _submitted(done, values_body(done.row))
    done, found = await submit.submit_and_wait(
        runtime, principal, spec, idempotency_key, length, wait, trace
    )
    return _submitted(done, await _waited_body(runtime, found), refused=found.refused)


def _submitted(done: Submitted, body: dict[str, Any], refused: bool = False) -> JSONResponse:
    """202 for a new job (finished or not), 200 for a replay of an earlier one."""
    headers = {"Location": f"/jobs/{done.row['id']}"}
    if done.replayed:
        headers["Idempotent-Replayed"] = "true"
    if refused:
        headers |= RETRY_AFTER
    return JSONResponse(body, status_code=200 if done.replayed else 202, headers=headers)


async def _waited_body(runtime: Runtime, found: waiting.Waited) -> dict[str, Any]:
    # A result kept in the result store is read back into the body.
    job = found.job
    return await results.inline_stored(runtime, job["result_ref"], values_body(job))


@router.post(
    "/jobs/batch",
    status_code=202,
    response_model=JobBatchResult,
    responses=PROBLEMS,
    dependencies=[Depends(require("submit", BodyKind.batch))],
    summary="Submit up to max_batch_jobs jobs in one transaction",
)
async def submit_batch(
    batch: JobBatchSubmit,
    request: Request,
    runtime: RuntimeDep,
    principal: PrincipalDep,
    traceparent: TraceparentHeader = None,
) -> JSONResponse:
    length = content_length(request)
    trace = valid_traceparent(traceparent)
    rows = await submit.submit_batch(runtime, principal, batch.jobs, length, trace)
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
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_QUERY)] = 0,
) -> JSONResponse:
    found = await waiting.read_job(runtime, principal, job_id, wait)
    body = await _waited_body(runtime, found)
    # What holds a queued job back, if anything.
    queued = body["status"] == "queued" and flow.active(runtime.db.engine)
    if queued and (blocked := await flow.blocked(runtime, body["queue"], body["limits"])):
        body["blocked_by"] = blocked
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
    created_after: Annotated[
        SafeDatetime | None, Query(description="RFC 3339: jobs created at or after")
    ] = None,
    created_before: Annotated[
        SafeDatetime | None, Query(description="RFC 3339: jobs created before")
    ] = None,
    id_prefix: Annotated[
        str | None, Query(pattern=r"^[0-9a-f-]{1,36}$", description="the id starts with this")
    ] = None,
) -> JSONResponse:
    window = jobs.IdWindow(created_after, created_before, id_prefix)
    rows, next_cursor = await runtime.db.read(
        lambda session: jobs.list_jobs(
            session,
            status=status,
            queue=queue,
            task=task,
            limit=limit,
            cursor=cursor,
            principal=principal,
            window=window,
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
