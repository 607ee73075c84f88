"""The worker protocol: lease jobs, heartbeat, and settle (complete, fail, release)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from service import errors, results
from service.auth import Principal
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
from service.longpoll import RETRY_AFTER
from service.models import JobRow, JobValues
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

router = APIRouter(route_class=GuardedRoute, tags=["worker protocol"])
CONTROL = [Depends(require("work", BodyKind.control))]
REPORT = [Depends(require("work", BodyKind.report))]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
# Leases are granted to the caller's key, and only its key may extend or settle them.
PrincipalDep = Annotated[Principal, Depends(get_principal)]


def _terms(runtime: Runtime, worker: str, lease_seconds: float | None, key_id: str) -> LeaseTerms:
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
        key_id=key_id,
    )


@router.post(
    "/leases",
    response_model=LeaseResponse,
    responses=PROBLEMS,
    dependencies=CONTROL,
    summary="Lease jobs",
)
async def lease_jobs(
    body: LeaseRequest, request: Request, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse:
    settings = runtime.settings
    if body.max_jobs > settings.max_lease_jobs:
        raise errors.ValidationFailed(f"max_jobs may be at most {settings.max_lease_jobs}")
    if body.wait > settings.max_lease_wait_seconds:
        raise errors.ValidationFailed(
            f"wait may be at most {settings.max_lease_wait_seconds:g} seconds"
        )
    key_id = principal.key_id
    _terms(runtime, body.worker, body.lease_seconds, key_id)  # validate before waiting
    queues = list(dict.fromkeys(body.queues))
    for name in queues:
        principal.check_queue(name)
    # Over a long-poll cap (service/longpoll.py) the request does not wait, but still
    # makes one attempt, so a busy service keeps handing out ready work.
    admitted = body.wait > 0 and runtime.long_polls.try_enter(key_id)
    lease = asyncio.ensure_future(
        runtime.dispatcher.lease(
            queues,
            body.max_jobs,
            body.wait if admitted else 0.0,
            lambda: _terms(runtime, body.worker, body.lease_seconds, key_id),
        )
    )
    if admitted:  # a long-poll: it may outlive its client
        # Its slot is held until the broker's wait ends, even when the client has gone:
        # an abandoned wait still costs what the cap bounds.
        lease.add_done_callback(lambda _: runtime.long_polls.leave(key_id))
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({lease, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not lease.done():
            # The worker gave up on this long-poll (it died, or stopped): end the request
            # now rather than hold it (and a stopping service) until the wait runs out.
            # The lease is not cancelled, as it may be claiming rows this very moment:
            # whatever it claims is handed straight back.
            runtime.spawn(
                _release_when_done(runtime, lease, key_id), name="celeriac-abandoned-lease"
            )
            return JSONResponse({"jobs": []})
    rows = await lease
    if rows and await request.is_disconnected():
        # Gone just as jobs were granted: the same, hand them back rather than leave
        # them leased to nobody until the deadline.
        await _release(runtime, rows, key_id)
        rows = []
    # Refused a wait and found nothing: the worker must come back later, not at once.
    refused = body.wait > 0 and not admitted and not rows
    return JSONResponse(
        {"jobs": [leased_body(row) for row in rows]}, headers=RETRY_AFTER if refused else None
    )


async def _disconnected(request: Request) -> None:
    """Returns when the client closes its connection. The body has been read, so the
    only message left to receive is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _release(runtime: Runtime, rows: list[JobValues], key_id: str) -> None:
    reports = [Settle(row["id"], row["lease_token"], "released") for row in rows]
    await _settle(runtime, reports, key_id)


async def _release_when_done(
    runtime: Runtime, lease: asyncio.Future[list[JobValues]], key_id: str
) -> None:
    if rows := await lease:
        await _release(runtime, rows, key_id)


@router.post(
    "/leases/claim",
    response_model=LeaseResponse,
    responses=PROBLEMS,
    dependencies=CONTROL,
    summary="Lease jobs by id, if they are still queued",
)
async def claim_jobs(
    body: LeaseClaim, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse:
    """A direct AMQP worker learns a job id from a RabbitMQ message and claims
    it here; SQL grants the lease exactly as for ``POST /leases``. Jobs that are not
    queued (already leased, finished, not yet due), or in a queue the caller's key may
    not use, are left out, never an error."""
    if len(body.ids) > runtime.settings.max_lease_jobs:
        raise errors.ValidationFailed(f"ids may hold at most {runtime.settings.max_lease_jobs}")
    terms = _terms(runtime, body.worker, body.lease_seconds, principal.key_id)
    ids = list(dict.fromkeys(body.ids))
    allows = None if principal.queues is None else principal.allows_queue
    rows = await runtime.db.run(lambda session: claim_by_ids(session, ids, terms, allows))
    return JSONResponse({"jobs": [leased_body(row) for row in rows]})


@router.post(
    "/jobs/{job_id}/heartbeat",
    response_model=HeartbeatResponse,
    responses=PROBLEMS,
    dependencies=REPORT,
    summary="Extend a lease (and report progress)",
)
async def heartbeat_one(
    job_id: str, body: Heartbeat, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse:
    terms = _terms(runtime, "", body.lease_seconds, principal.key_id)
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
    dependencies=REPORT,
    summary="Extend many leases in one call",
)
async def heartbeat_many(
    body: HeartbeatBatch, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse:
    terms = _terms(runtime, "", body.lease_seconds, principal.key_id)
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


async def _settle(runtime: Runtime, reports: list[Settle], key_id: str) -> list[SettleOutcome]:
    now = runtime.clock.now()

    def work(session: Session, effects: Effects) -> list[SettleOutcome]:
        return settle(session, reports, now, effects, key_id=key_id)

    return await runtime.transact(work)


async def _settle_one(runtime: Runtime, report: Settle, key_id: str) -> JSONResponse:
    now = runtime.clock.now()

    def work(session: Session, effects: Effects) -> JobRow:
        [outcome] = settle(session, [report], now, effects, key_id=key_id)
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
    "/jobs/{job_id}/complete",
    response_model=Job,
    responses=PROBLEMS,
    dependencies=[Depends(require("work", BodyKind.result))],
    summary="Report success",
)
async def complete(
    job_id: str, body: Complete, request: Request, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse:
    # A large result goes to the result store first (413 without a store, as
    # before); a report that does not settle deletes its file again.
    report = Settle(job_id, body.token, "succeeded", result=body.result)
    [report], stored = await results.place(runtime, content_length(request), [report])
    try:
        return await _settle_one(runtime, report, principal.key_id)
    except BaseException:
        await results.discard(runtime, stored)
        raise


@router.post(
    "/jobs/{job_id}/fail",
    response_model=Job,
    responses=PROBLEMS,
    dependencies=REPORT,
    summary="Report failure",
)
async def fail(
    job_id: str, body: Fail, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse:
    report = Settle(
        job_id,
        body.token,
        "failed",
        error=body.error.model_dump(exclude_none=True),
        retry=body.retry,
        retry_in=body.retry_in,
    )
    return await _settle_one(runtime, report, principal.key_id)


@router.post(
    "/jobs/{job_id}/release",
    response_model=Job,
    responses=PROBLEMS,
    dependencies=CONTROL,
    summary="Give an unstarted job back (not counted as an attempt)",
)
async def release(
    job_id: str, body: Release, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse:
    report = Settle(job_id, body.token, "released")
    return await _settle_one(runtime, report, principal.key_id)


@router.post(
    "/leases/report",
    response_model=ReportBatchResponse,
    responses=PROBLEMS,
    dependencies=[Depends(require("work", BodyKind.batch))],
    summary="Settle many leases in one call",
)
async def report_many(
    body: ReportBatch, request: Request, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse:
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
        outcomes = await _settle(runtime, reports, principal.key_id)
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
