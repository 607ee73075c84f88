"""An administrator's commands on one job (``POST /jobs/{id}/cancel|retry``), each one
transaction whose effects follow its commit."""

from __future__ import annotations

from sqlalchemy.orm import Session

from service import jobs
from service.auth import Principal
from service.leases import Effects
from service.models import JobRow
from service.runtime import Runtime
from service.states import JobStatus


async def cancel(runtime: Runtime, principal: Principal, job_id: str) -> JobRow:
    """A pending job is cancelled now; a running one is told at its next heartbeat."""

    def work(session: Session, effects: Effects) -> JobRow:
        row = jobs.cancel_job(session, job_id, runtime.clock.now(), effects, principal)
        if row.status == JobStatus.cancelled:
            effects.finished.append(row.id)
        return row

    return await runtime.transact(work)


async def retry(runtime: Runtime, principal: Principal, job_id: str) -> JobRow:
    """A failed, cancelled or expired job, queued again."""

    def work(session: Session, effects: Effects) -> JobRow:
        row = jobs.retry_job(session, job_id, runtime.clock.now(), principal)
        effects.dispatch.append(jobs.dispatch_of(row))
        return row

    return await runtime.transact(work)
