"""The worker protocol: lease jobs, heartbeat, and settle (complete, fail, release)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from service import errors, results
from service.jobs import get_job
from service.leases import (
    Effects,
    LeaseTerms,
    Settle,
    SettleOutcome,
    claim_by_ids,
    heartbeat,
    new_token,
    settle,
)
from service.models import JobRow, JobValues
from service.routers.deps import content_length, get_runtime, require
from service.routers.jobs import PROBLEMS
from service.runtime import Runtime
from service.schemas import (
    Complete,
    Fail,
    Heartbeat,
    HeartbeatBatch,
    HeartbeatBatchResponse,
    HeartbeatResponse,
    Job,
    LeaseClaim,
    LeaseRequest,
    LeaseResponse,
    Release,
    ReportBatch,
    ReportBatchResponse,
)
from service.serialize import iso, job_body, leased_body

router = APIRouter(tags=["worker protocol"], dependencies=[Depends(require("work"))])
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def _terms(runtime: Runtime, worker: str, lease_seconds: float | None) -> LeaseTerms:
    settings = runtime.settings
    if lease_seconds is not None and lease_seconds > settings.max_lease_seconds:
        raise errors.ValidationFailed(
            f"lease_seconds may be at most {settings.max_lease_seconds:g} "
            "(CELERIAC_MAX_LEASE_SECONDS)"
        )
    return LeaseTerms(
        worker=worker,
        token=new_token(),
        now=runtime.clock.now(),
        lease_seconds=lease_seconds,
        default_seconds=settings.default_lease_seconds,
    )


@router.post("/leases", response_model=LeaseResponse, responses=PROBLEMS, summary="Lease jobs")
async def lease_jobs(body: LeaseRequest, request: Request, runtime: RuntimeDep) -> JSONResponse:
    settings = runtime.settings
    if body.max_jobs > settings.max_lease_jobs:
        raise errors.ValidationFailed(f"max_jobs may be at most {settings.max_lease_jobs}")
    if body.wait > settings.max_lease_wait_seconds:
        raise errors.ValidationFailed(
            f"wait may be at most {settings.max_lease_wait_seconds:g} seconds"
        )
    _terms(runtime, body.worker, body.lease_seconds)  # validate before waiting
    queues = list(dict.fromkeys(body.queues))
    lease = asyncio.ensure_future(
        runtime.broker.lease(
            queues,
            body.max_jobs,
            body.wait,
            lambda: _terms(runtime, body.worker, body.lease_seconds),
        )
    )
    if body.wait > 0:  # a long-poll: it may outlive its client
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({lease, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not lease.done():
            # The worker gave up on this long-poll (it died, or stopped): end the request
            # now rather than hold it (and a stopping service) until the wait runs out.
            # The lease is not cancelled, as it may be claiming rows this very moment:
            # whatever it claims is handed straight back.
            runtime.spawn(_release_when_done(runtime, lease), name="celeriac-abandoned-lease")
            return JSONResponse({"jobs": []})
    rows = await lease
    if rows and await request.is_disconnected():
        # Gone just as jobs were granted: the same, hand them back rather than leave
        # them leased to nobody until the deadline.
        await _release(runtime, rows)
        rows = []
    return JSONResponse({"jobs": [leased_body(row) for row in rows]})


async def _disconnected(request: Request) -> None:
    """Returns when the client closes its connection. The body has been read, so the
    only message left to receive is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _release(runtime: Runtime, rows: list[JobValues]) -> None:
    await _settle(runtime, [Settle(row["id"], row["lease_token"], "released") for row in rows])


async def _release_when_done(runtime: Runtime, lease: asyncio.Future[list[JobValues]]) -> None:
    if rows := await lease:
        await _release(runtime, rows)


@router.post(
    "/leases/claim",
    response_model=LeaseResponse,
    responses=PROBLEMS,
    summary="Lease jobs by id, if they are still queued",
)
async def claim_jobs(body: LeaseClaim, runtime: RuntimeDep) -> JSONResponse:
    """A direct AMQP worker learns a job id from a RabbitMQ message and claims
    it here; SQL grants the lease exactly as for ``POST /leases``. Jobs that are not
    queued (already leased, finished, not yet due) are left out, never an error."""
    if len(body.ids) > runtime.settings.max_lease_jobs:
        raise errors.ValidationFailed(f"ids may hold at most {runtime.settings.max_lease_jobs}")
    terms = _terms(runtime, body.worker, body.lease_seconds)
    ids = list(dict.fromkeys(body.ids))
    rows = await runtime.db.run(lambda session: claim_by_ids(session, ids, terms))
    return JSONResponse({"jobs": [leased_body(row) for row in rows]})


@router.post(
    "/jobs/{job_id}/heartbeat",
    response_model=HeartbeatResponse,
    responses=PROBLEMS,
    summary="Extend a lease (and report progress)",
)
async def heartbeat_one(job_id: str, body: Heartbeat, runtime: RuntimeDep) -> JSONResponse:
    terms = _terms(runtime, "", body.lease_seconds)
    [outcome] = await runtime.db.run(
        lambda session: heartbeat(session, [(job_id, body.token, body.progress)], terms)
    )
    _raise_problem(job_id, outcome.problem)
    return JSONResponse(
        {
            "lease": {"token": body.token, "expires_at": iso(outcome.expires_at)},
            "cancel_requested": outcome.cancel_requested,
        }
    )


@router.post(
    "/leases/heartbeat",
    response_model=HeartbeatBatchResponse,
    responses=PROBLEMS,
    summary="Extend many leases in one call",
)
async def heartbeat_many(body: HeartbeatBatch, runtime: RuntimeDep) -> JSONResponse:
    terms = _terms(runtime, "", body.lease_seconds)
    items = [(ref.id, ref.token, ref.progress) for ref in body.leases]
    outcomes = await runtime.db.run(lambda session: heartbeat(session, items, terms))
    return JSONResponse(
        {
            "leases": [
                {
                    "id": o.id,
                    "ok": o.problem is None,
                    "expires_at": iso(o.expires_at),
                    "cancel_requested": o.cancel_requested,
                    "detail": o.problem,
                }
                for o in outcomes
            ]
        }
    )


async def _settle(runtime: Runtime, reports: list[Settle]) -> list[SettleOutcome]:
    now = runtime.clock.now()

    def work(session: Session, effects: Effects) -> list[SettleOutcome]:
        return settle(session, reports, now, effects)

    return await runtime.transact(work)


async def _settle_one(runtime: Runtime, report: Settle) -> JSONResponse:
    now = runtime.clock.now()

    def work(session: Session, effects: Effects) -> JobRow:
        [outcome] = settle(session, [report], now, effects)
        _raise_problem(report.id, outcome.problem)
        return get_job(session, report.id)

    return JSONResponse(job_body(await runtime.transact(work)))


def _raise_problem(job_id: str, problem: str | None) -> None:
    if problem == "not-found":
        raise errors.JobNotFound(f"no job has id {job_id!r}")
    if problem == "stale-lease":
        raise errors.StaleLease(
            f"job {job_id} is no longer leased with this token (the lease expired and was "
            "re-granted, or the job was settled): drop it, the report changed nothing"
        )


@router.post(
    "/jobs/{job_id}/complete", response_model=Job, responses=PROBLEMS, summary="Report success"
)
async def complete(
    job_id: str, body: Complete, request: Request, runtime: RuntimeDep
) -> JSONResponse:
    # A large result goes to the result store first (413 without a store, as
    # before); a report that does not settle deletes its file again.
    report = Settle(job_id, body.token, "succeeded", result=body.result)
    [report], stored = await results.place(runtime, content_length(request), [report])
    try:
        return await _settle_one(runtime, report)
    except BaseException:
        await results.discard(runtime, stored)
        raise


@router.post(
    "/jobs/{job_id}/fail", response_model=Job, responses=PROBLEMS, summary="Report failure"
)
async def fail(job_id: str, body: Fail, runtime: RuntimeDep) -> JSONResponse:
    report = Settle(
        job_id,
        body.token,
        "failed",
        error=body.error.model_dump(exclude_none=True),
        retry=body.retry,
        retry_in=body.retry_in,
    )
    return await _settle_one(runtime, report)


@router.post(
    "/jobs/{job_id}/release",
    response_model=Job,
    responses=PROBLEMS,
    summary="Give an unstarted job back (not counted as an attempt)",
)
async def release(job_id: str, body: Release, runtime: RuntimeDep) -> JSONResponse:
    return await _settle_one(runtime, Settle(job_id, body.token, "released"))


@router.post(
    "/leases/report",
    response_model=ReportBatchResponse,
    responses=PROBLEMS,
    summary="Settle many leases in one call",
)
async def report_many(body: ReportBatch, request: Request, runtime: RuntimeDep) -> JSONResponse:
    reports: list[Settle] = []
    for item in body.reports:
        if item.outcome == "failed" and item.error is None:
            raise errors.ValidationFailed(f"report for job {item.id}: a failure needs an error")
        error: dict[str, Any] | None = (
            None if item.error is None else item.error.model_dump(exclude_none=True)
        )
        reports.append(
            Settle(item.id, item.token, item.outcome, item.result, error, item.retry, item.retry_in)
        )
    reports, stored = await results.place(runtime, content_length(request), reports)
    try:
        outcomes = await _settle(runtime, reports)
    except BaseException:
        await results.discard(runtime, stored)
        raise
    unsettled = zip(reports, outcomes, strict=True)
    await results.discard(
        runtime, [r.result_ref for r, o in unsettled if o.problem and r.result_ref]
    )
    return JSONResponse(
        {
            "reports": [
                {
                    "id": o.id,
                    "ok": o.problem is None,
                    "status": o.status,
                    "detail": o.problem,
                }
                for o in outcomes
            ]
        }
    )
