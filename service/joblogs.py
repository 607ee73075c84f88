"""Per-attempt job logs (issue 16): what a worker sends as ``logs`` with a report is kept
with the attempt it belongs to, written in the settle's own transaction (one insert for
the batch), and served by ``GET /jobs/{id}/logs``. Any worker may send them: the field is
part of every report (docs/protocol.md); the Python worker captures what a task logs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service import jobs
from service.auth import Principal
from service.models import JobLogRow

JOB_LOGS = cast(sa.Table, JobLogRow.__table__)
# The report field's bound: 64 KiB of UTF-8 as the Python worker keeps it, plus its
# truncation marker. In characters (what the schema checks), so never below the bytes.
MAX_LOGS_CHARS = 65536 + 256


@dataclass(frozen=True, slots=True)
class AttemptLog:
    job_id: str
    attempt: int
    worker: str | None
    outcome: str
    logs: str


def record(session: Session, entries: Sequence[AttemptLog], now: datetime) -> None:
    """Store the logs of settled attempts; one statement for the batch."""
    if not entries:
        return
    session.execute(
        sa.insert(JOB_LOGS),
        [
            {
                "job_id": e.job_id,
                "attempt": e.attempt,
                "worker": e.worker,
                "outcome": e.outcome,
                "logs": e.logs,
                "created_at": now,
            }
            for e in entries
        ],
    )


def of_job(session: Session, job_id: str) -> list[dict[str, Any]]:
    """Every logged attempt of a job, oldest first."""
    c = JOB_LOGS.c
    query = (
        sa.select(c.attempt, c.worker, c.outcome, c.logs, c.created_at)
        .where(c.job_id == job_id)
        .order_by(c.id)
    )
    return [dict(row._mapping) for row in session.execute(query)]


def delete_for(session: Session, job_ids: Sequence[str]) -> int:
    """With their jobs (retention, bulk delete)."""
    if not job_ids:
        return 0
    result = session.execute(sa.delete(JOB_LOGS).where(JOB_LOGS.c.job_id.in_(job_ids)))
    return int(getattr(result, "rowcount", 0) or 0)


def read(session: Session, job_id: str, principal: Principal) -> list[dict[str, Any]]:
    """``GET /jobs/{id}/logs``: 404 for a job that is not there or not the caller's."""
    jobs.get_job(session, job_id, visible_to=principal)
    return of_job(session, job_id)
