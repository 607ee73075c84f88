"""The worker protocol: lease jobs, heartbeat, and settle (complete, fail, release).
The domain is in service.lease_requests and service.reports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from service import lease_requests, reports
from service.auth import Principal
from service.leases import Settle
from service.longpoll import RETRY_AFTER
from service.routers.deps import (
    BodyKind,
    GuardedRoute,
    client_has_left,
    content_length,
    get_principal,
    get_runtime,
    require,
    until_client_leaves,
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
from service.serialize import JSONResponse, iso, leased_body, values_body
from service.states import Outcome

router = APIRouter(route_class=GuardedRoute, tags=["worker protocol"])
CONTROL = [Depends(require("work", BodyKind.control))]
REPORT = [Depends(require("work", BodyKind.report))]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
# Leases are granted to the caller's key, and only its key may extend or settle them.
PrincipalDep = Annotated[Principal, Depends(get_principal)]


@dataclass(frozen=True, slots=True)
class _Connection:
    """A long-poll's client (``lease_requests.Client``), told by its ASGI connection."""

    request: Request

    async def gone(self) -> None:
        await until_client_leaves(self.request)

    async def is_gone(self) -> bool:
        return await client_has_left(self.request)


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
    leased = await lease_requests.lease(runtime, principal, body, _Connection(request))
    return JSONResponse(
        {"jobs": [leased_body(row) for row in leased.rows]},
        headers=RETRY_AFTER if leased.refused else None,
    )


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
    rows = await lease_requests.claim(runtime, principal, body)
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
    outcome = await lease_requests.extend_one(runtime, job_id, body, principal.key_id)
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
    items = [(ref.id, ref.token, ref.progress) for ref in body.leases]
    outcomes = await lease_requests.extend(runtime, items, body.lease_seconds, principal.key_id)
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


async def _settle_one(
    runtime: Runtime, report: Settle, principal: Principal, request: Request
) -> JSONResponse:
    row = await reports.settle_one(runtime, report, principal.key_id, content_length(request))
    return JSONResponse(values_body(row))


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
    report = Settle(job_id, body.token, Outcome.succeeded, result=body.result, logs=body.logs)
    return await _settle_one(runtime, report, principal, request)


@router.post(
    "/jobs/{job_id}/fail",
    response_model=Job,
    responses=PROBLEMS,
    dependencies=REPORT,
    summary="Report failure",
)
async def fail(
    job_id: str, body: Fail, request: Request, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse:
    report = Settle(
        job_id,
        body.token,
        Outcome.failed,
        error=body.error.model_dump(exclude_none=True),
        retry=body.retry,
        retry_in=body.retry_in,
        logs=body.logs,
    )
    return await _settle_one(runtime, report, principal, request)


@router.post(
    "/jobs/{job_id}/release",
    response_model=Job,
    responses=PROBLEMS,
    dependencies=CONTROL,
    summary="Give an unstarted job back (not counted as an attempt)",
)
async def release(
    job_id: str, body: Release, request: Request, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse:
    report = Settle(job_id, body.token, Outcome.released)
    return await _settle_one(runtime, report, principal, request)


@router.post(
    "/leases/report",
    response_model=ReportBatchResponse,
    responses=PROBLEMS,
    dependencies=[Depends(require("work", BodyKind.batch))],
    summary="Settle many leases in one call (and, with `next`, lease the next jobs)",
    description="With `next` (report-and-fetch, docs/protocol.md) the reports are settled "
    "and committed first, exactly as without it; then jobs are leased as `POST /leases` "
    "with that body would (waiting up to its `wait`), and the answer carries them in "
    "`jobs`. A `next` the lease refuses (a queue the key may not use, a limit) refuses "
    "the request before any report is settled.",
)
async def report_many(
    body: ReportBatch, request: Request, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse:
    length = content_length(request)
    if body.next is not None:  # refused before anything is settled, not after
        lease_requests.check(runtime, principal, body.next)
    outcomes = await reports.report_many(runtime, body.reports, principal.key_id, length)
    answer: dict[str, Any] = {
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
    if body.next is None:
        return JSONResponse(answer)
    leased = await lease_requests.lease(runtime, principal, body.next, _Connection(request))
    answer["jobs"] = [leased_body(row) for row in leased.rows]
    return JSONResponse(answer, headers=RETRY_AFTER if leased.refused else None)
