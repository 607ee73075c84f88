"""Jobs: submit, read, list, cancel, retry."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import errors, jobs, results
from service.auth import Principal
from service.isolation import refusing_unstorable
from service.leases import Effects
from service.longpoll import RETRY_AFTER
from service.models import JobRow, JobValues, values_of
from service.routers.deps import (
    BodyKind,
    GuardedRoute,
    check_payload_size,
    get_principal,
    get_runtime,
    require,
)
from service.routers.problems import PROBLEMS, SUBMIT
from service.runtime import Runtime
from service.schemas import (
    FINISHED,
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
    principal.check_queue(spec.queue)
    check_payload_size(request, "args and kwargs", spec.args, spec.kwargs)
    row = jobs.new_job(spec, runtime.clock.now(), runtime.defaults)
    if idempotency_key is None:
        await runtime.submits.submit(row)
        replayed = False
    else:
        key = jobs.scoped_idempotency_key(principal.key_id, idempotency_key)
        row, replayed = await _submit_idempotent(runtime, row, key, spec)
    headers = {"Location": f"/jobs/{row['id']}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(values_body(row), status_code=200 if replayed else 202, headers=headers)


async def _submit_idempotent(
    runtime: Runtime, row: JobValues, key: str, spec: JobSubmit
) -> tuple[JobValues, bool]:
    body_hash = jobs.request_hash(spec)
    row.update(idempotency_key=key, request_hash=body_hash)
    ttl = runtime.settings.idempotency_ttl_seconds

    def work(session: Session) -> tuple[JobValues, bool]:
        existing = jobs.find_by_idempotency_key(session, key, row["created_at"], ttl)
        if existing is not None:
            return values_of(jobs.replay_or_reject(existing, body_hash)), True
        jobs.insert_jobs(session, [row])
        return row, False

    with refusing_unstorable():  # a value the database refuses: 422, not 500 (issue 12)
        try:
            stored, replayed = await runtime.db.run(work)
        except IntegrityError:  # a concurrent request with the same key won the insert
            stored, replayed = await runtime.db.run(work)
    if not replayed:
        await runtime.after_submit([stored])
    return stored, replayed


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
    limit = runtime.settings.max_batch_jobs
    if len(batch.jobs) > limit:
        raise errors.PayloadTooLarge(
            f"the batch has {len(batch.jobs)} jobs; the limit is {limit} "
            "(CELERIAC_MAX_BATCH_JOBS). Split it into several requests."
        )
    jobs.check_queues(principal, (spec.queue for spec in batch.jobs))
    now = runtime.clock.now()
    rows = []
    for index, spec in enumerate(batch.jobs):
        try:
            check_payload_size(request, f"jobs[{index}] args and kwargs", spec.args, spec.kwargs)
            rows.append(jobs.new_job(spec, now, runtime.defaults))
        except errors.ProblemError as exc:
            exc.detail = f"jobs[{index}]: {exc.detail}"
            raise
    with refusing_unstorable("a job of the batch"):  # 422, not 500 (issue 12)
        await runtime.db.run(lambda session: jobs.insert_jobs(session, rows))
    await runtime.after_submit(rows)
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
    if principal.queues is not None:  # another tenant's job is not found (nor waited on)
        await runtime.db.read(lambda session: jobs.check_visible(session, job_id, principal))
    wait = min(wait, runtime.settings.max_result_wait_seconds)
    # Over a long-poll cap (service/longpoll.py): the job as it is now, and Retry-After.
    admitted = wait > 0 and runtime.long_polls.try_enter(principal.key_id)
    try:
        row = await _wait_for_finish(runtime, job_id, wait if admitted else 0.0)
    finally:
        if admitted:
            runtime.long_polls.leave(principal.key_id)
    refused = wait > 0 and not admitted and row.status not in FINISHED
    # A result kept in the result store is read back into the body.
    body = await results.inline_stored(runtime, row, job_body(row))
    return JSONResponse(body, headers=RETRY_AFTER if refused else None)


async def _wait_for_finish(runtime: Runtime, job_id: str, wait: float) -> JobRow:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    event = runtime.signals.finished_waiter(job_id)
    try:
        while True:
            # Clear before reading, never after: a finish that lands between the read and
            # the wait must still wake us.
            event.clear()
            row = await runtime.db.read(lambda session: jobs.get_job(session, job_id))
            remaining = deadline - loop.time()
            if row.status in FINISHED or remaining <= 0:
                return row
            # No re-read on a timer: a finish anywhere sets the event (this process's
            # commits, NOTIFY or pub/sub, or the SQL broker's one shared poll for all
            # waiters on a database without notifications, service/brokers/sql.py).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)
    finally:
        runtime.signals.drop_finished_waiter(job_id, event)


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
    def work(session: Session, effects: Effects) -> JobRow:
        row = jobs.cancel_job(session, job_id, runtime.clock.now(), effects, principal)
        if row.status == JobStatus.cancelled:
            effects.finished.append(row.id)
        return row

    row = await runtime.transact(work)
    return JSONResponse(job_body(row))


@router.post(
    "/jobs/{job_id}/retry",
    response_model=Job,
    responses=PROBLEMS,
    dependencies=[Depends(require("admin"))],
    summary="Queue a failed, cancelled or expired job again",
)
async def retry_job(job_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> JSONResponse:
    def work(session: Session, effects: Effects) -> JobRow:
        row = jobs.retry_job(session, job_id, runtime.clock.now(), principal)
        effects.dispatch.append(jobs.dispatch_of(row))
        return row

    return JSONResponse(job_body(await runtime.transact(work)))
