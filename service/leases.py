"""The worker protocol's domain: claim jobs under a lease, extend it, and settle it.

Fencing: every write that settles or extends a lease matches on (id, token, running), with
the rows locked first, so a worker whose lease was reclaimed and re-granted can change
nothing. Plain functions over a Session; the caller owns the transaction."""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.jobs import PENDING, Dispatch, dispatch_of
from service.models import JobRow
from service.schemas import JobStatus

BATCH_LIMIT = 1000


def new_token() -> str:
    return secrets.token_urlsafe(18)


@dataclass(frozen=True, slots=True)
class LeaseTerms:
    worker: str
    token: str
    now: datetime
    lease_seconds: float | None  # None: each job's own timeout, else the default
    default_seconds: float

    def deadline(self, row: JobRow) -> datetime:
        seconds = self.lease_seconds or row.timeout or self.default_seconds
        return self.now + timedelta(seconds=seconds)


def _detached(session: Session, query: sa.Select[tuple[JobRow]]) -> list[JobRow]:
    """Load rows we will change with explicit statements, not through the unit of work
    (which would write each change a second time at flush)."""
    rows = list(session.scalars(query))
    for row in rows:
        session.expunge(row)
    return rows


def _ready(queue: str, now: datetime) -> sa.ColumnElement[bool]:
    return sa.and_(
        JobRow.queue == queue,
        JobRow.status == JobStatus.queued,
        sa.or_(JobRow.expires_at.is_(None), JobRow.expires_at > now),
    )


def claim_from_queues(
    session: Session, queues: Sequence[str], max_jobs: int, terms: LeaseTerms
) -> list[JobRow]:
    """SQL dispatch: take up to max_jobs ready jobs, queues in the given order, highest
    priority then oldest first. SKIP LOCKED lets concurrent claimers pass each other."""
    claimed: list[JobRow] = []
    for queue in queues:
        want = max_jobs - len(claimed)
        if want <= 0:
            break
        query = (
            sa.select(JobRow)
            .where(_ready(queue, terms.now))
            .order_by(JobRow.priority.desc(), JobRow.id)
            .limit(want)
            .with_for_update(skip_locked=True)
        )
        claimed.extend(_grant(session, _detached(session, query), terms))
    return claimed


def claim_by_ids(session: Session, ids: Sequence[str], terms: LeaseTerms) -> list[JobRow]:
    """Broker dispatch: the broker proposed these ids; SQL decides which are still ready."""
    if not ids:
        return []
    query = (
        sa.select(JobRow)
        .where(
            JobRow.id.in_(ids),
            JobRow.status == JobStatus.queued,
            sa.or_(JobRow.expires_at.is_(None), JobRow.expires_at > terms.now),
        )
        .with_for_update(skip_locked=True)
    )
    rows = {row.id: row for row in _detached(session, query)}
    # Keep the broker's order: it encodes priority.
    return _grant(session, [rows[i] for i in ids if i in rows], terms)


def _grant(session: Session, rows: list[JobRow], terms: LeaseTerms) -> list[JobRow]:
    if not rows:
        return rows
    by_deadline: dict[datetime, list[str]] = {}
    for row in rows:
        deadline = terms.deadline(row)
        row.status = JobStatus.running
        row.attempt += 1
        row.lease_token = terms.token
        row.lease_worker = terms.worker
        row.lease_expires_at = deadline
        row.started_at = terms.now
        by_deadline.setdefault(deadline, []).append(row.id)
    # One UPDATE per distinct deadline (usually one), not one per job.
    for deadline, ids in by_deadline.items():
        session.execute(
            sa.update(JobRow)
            .where(JobRow.id.in_(ids))
            .values(
                status=JobStatus.running,
                attempt=JobRow.attempt + 1,
                lease_token=terms.token,
                lease_worker=terms.worker,
                lease_expires_at=deadline,
                started_at=terms.now,
            )
            .execution_options(synchronize_session=False)
        )
    return rows


@dataclass(slots=True)
class LeaseCheck:
    """A (job, token) pair checked against the locked row."""

    id: str
    token: str
    row: JobRow | None = None
    problem: str | None = None


def _lock_and_check(session: Session, pairs: Iterable[tuple[str, str]]) -> list[LeaseCheck]:
    checks = [LeaseCheck(job_id, token) for job_id, token in pairs]
    ids = list({c.id for c in checks})
    query = sa.select(JobRow).where(JobRow.id.in_(ids)).with_for_update()
    rows = {row.id: row for row in _detached(session, query)}
    for check in checks:
        row = rows.get(check.id)
        if row is None:
            check.problem = "not-found"
        elif row.status != JobStatus.running or row.lease_token != check.token:
            check.problem = "stale-lease"
        else:
            check.row = row
    return checks


@dataclass(slots=True)
class HeartbeatOutcome:
    id: str
    problem: str | None
    expires_at: datetime | None = None
    cancel_requested: bool = False


def heartbeat(
    session: Session,
    items: Sequence[tuple[str, str, Any]],
    terms: LeaseTerms,
) -> list[HeartbeatOutcome]:
    """Extend leases (and store progress). items: (job id, token, progress or None)."""
    progress = {job_id: p for job_id, _token, p in items}
    outcomes: list[HeartbeatOutcome] = []
    updates: list[dict[str, Any]] = []
    for check in _lock_and_check(session, ((i, t) for i, t, _p in items)):
        if check.row is None:
            outcomes.append(HeartbeatOutcome(check.id, check.problem))
            continue
        row = check.row
        row.lease_expires_at = terms.deadline(row)
        change: dict[str, Any] = {"id": row.id, "lease_expires_at": row.lease_expires_at}
        if progress[row.id] is not None:
            row.progress = progress[row.id]
        change["progress"] = row.progress
        updates.append(change)
        outcomes.append(
            HeartbeatOutcome(row.id, None, row.lease_expires_at, row.cancel_requested)
        )
    if updates:
        session.execute(sa.update(JobRow), updates)
    return outcomes


@dataclass(frozen=True, slots=True)
class Settle:
    """One worker report. outcome: succeeded | failed | released."""

    id: str
    token: str
    outcome: str
    result: Any = None
    error: dict[str, Any] | None = None
    retry: bool = True
    retry_in: float | None = None


@dataclass(slots=True)
class SettleOutcome:
    id: str
    problem: str | None
    row: JobRow | None = None


@dataclass(slots=True)
class Effects:
    """What must happen after commit: jobs to dispatch, waiters to wake, a timer to set."""

    dispatch: list[Dispatch] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    earliest_due: datetime | None = None

    def due_at(self, when: datetime) -> None:
        if self.earliest_due is None or when < self.earliest_due:
            self.earliest_due = when


_SETTLE_COLUMNS = (
    "status",
    "result",
    "error",
    "attempt",
    "run_at",
    "finished_at",
    "lease_token",
    "lease_expires_at",
)


def settle(
    session: Session, reports: Sequence[Settle], now: datetime, effects: Effects
) -> list[SettleOutcome]:
    """Apply worker reports in one pass: lock the rows, check each token, and write all
    new states with one executemany."""
    outcomes: list[SettleOutcome] = []
    updates: list[dict[str, Any]] = []
    checks = _lock_and_check(session, ((r.id, r.token) for r in reports))
    for report, check in zip(reports, checks, strict=True):
        if check.row is None:
            outcomes.append(SettleOutcome(check.id, check.problem))
            continue
        row = check.row
        _apply(row, report, now, effects)
        check.problem = "stale-lease"  # a second report on the same lease in this batch
        updates.append({"id": row.id, **{c: getattr(row, c) for c in _SETTLE_COLUMNS}})
        outcomes.append(SettleOutcome(row.id, None, row))
    if updates:
        session.execute(sa.update(JobRow), updates)
    return outcomes


def _apply(row: JobRow, report: Settle, now: datetime, effects: Effects) -> None:
    row.lease_token = None
    row.lease_expires_at = None
    if report.outcome == "succeeded":
        _finish(row, JobStatus.succeeded, now, effects)
        row.result = report.result
        row.error = None
    elif report.outcome == "released":
        row.status = JobStatus.queued
        row.attempt = max(row.attempt - 1, 0)  # it never ran: not an attempt
        effects.dispatch.append(dispatch_of(row))
    else:
        row.error = report.error
        if row.cancel_requested:
            _finish(row, JobStatus.cancelled, now, effects)
        elif report.retry and row.attempt <= row.max_retries:
            delay = report.retry_in if report.retry_in is not None else backoff(row)
            row.status = JobStatus.retrying
            row.run_at = now + timedelta(seconds=delay)
            effects.due_at(row.run_at)
        else:
            _finish(row, JobStatus.failed, now, effects)


def _finish(row: JobRow, status: JobStatus, now: datetime, effects: Effects) -> None:
    row.status = status
    row.finished_at = now
    effects.finished.append(row.id)


def backoff(row: JobRow) -> float:
    """Exponential in the attempt number, capped, with optional jitter in [50 %, 100 %]."""
    delay = min(row.backoff_max, row.backoff_base * 2 ** max(row.attempt - 1, 0))
    return delay * random.uniform(0.5, 1.0) if row.backoff_jitter else delay


# --- maintenance: run by every replica; SKIP LOCKED keeps them out of each other's way ---


def promote_due(session: Session, now: datetime, effects: Effects) -> int:
    """Scheduled and retrying jobs whose time has come become queued."""
    rows = _detached(
        session,
        sa.select(JobRow)
        .where(JobRow.status.in_((JobStatus.scheduled, JobStatus.retrying)))
        .where(JobRow.run_at <= now)
        .order_by(JobRow.run_at)
        .limit(BATCH_LIMIT)
        .with_for_update(skip_locked=True),
    )
    if rows:
        session.execute(
            sa.update(JobRow)
            .where(JobRow.id.in_([r.id for r in rows]))
            .values(status=JobStatus.queued)
            .execution_options(synchronize_session=False)
        )
        effects.dispatch.extend(dispatch_of(r) for r in rows)
    return len(rows)


def reclaim_expired_leases(session: Session, now: datetime, effects: Effects) -> int:
    """A lease whose deadline passed means a dead or stuck worker: run the job again, or
    fail it once it has used every attempt (a job that kills its worker must not loop)."""
    rows = _detached(
        session,
        sa.select(JobRow)
        .where(JobRow.status == JobStatus.running, JobRow.lease_expires_at < now)
        .limit(BATCH_LIMIT)
        .with_for_update(skip_locked=True),
    )
    updates: list[dict[str, Any]] = []
    for row in rows:
        if row.cancel_requested:
            _finish(row, JobStatus.cancelled, now, effects)
        elif row.attempt > row.max_retries:
            row.error = {
                "type": "LeaseExpired",
                "message": f"worker {row.lease_worker} stopped heartbeating; no retries left",
            }
            _finish(row, JobStatus.failed, now, effects)
        else:
            row.status = JobStatus.queued
            effects.dispatch.append(dispatch_of(row))
        row.lease_token = None
        row.lease_expires_at = None
        updates.append({"id": row.id, **{c: getattr(row, c) for c in _SETTLE_COLUMNS}})
    if updates:
        session.execute(sa.update(JobRow), updates)
    return len(rows)


def expire_pending(session: Session, now: datetime, effects: Effects) -> int:
    rows = list(
        session.scalars(
            sa.select(JobRow.id)
            .where(JobRow.status.in_(PENDING), JobRow.expires_at <= now)
            .limit(BATCH_LIMIT)
            .with_for_update(skip_locked=True)
        )
    )
    if rows:
        session.execute(
            sa.update(JobRow)
            .where(JobRow.id.in_(rows), JobRow.status.in_(PENDING))
            .values(status=JobStatus.expired, finished_at=now)
            .execution_options(synchronize_session=False)
        )
        effects.finished.extend(rows)
    return len(rows)


def next_deadline(session: Session) -> datetime | None:
    """The earliest moment maintenance has work: a due job, an expiring lease or job."""
    candidates = [
        session.scalar(
            sa.select(sa.func.min(JobRow.run_at)).where(
                JobRow.status.in_((JobStatus.scheduled, JobStatus.retrying))
            )
        ),
        session.scalar(
            sa.select(sa.func.min(JobRow.lease_expires_at)).where(
                JobRow.status == JobStatus.running
            )
        ),
        session.scalar(
            sa.select(sa.func.min(JobRow.expires_at)).where(JobRow.status.in_(PENDING))
        ),
    ]
    present = [c for c in candidates if c is not None]
    return min(present) if present else None


def queued_since(
    session: Session, before: datetime | None, limit: int, *, after_id: str = ""
) -> list[Dispatch]:
    """Queued jobs (ready since ``before``, if given), in id order after ``after_id``:
    what a dispatch index must hold."""
    query = (
        sa.select(JobRow.id, JobRow.queue, JobRow.priority)
        .where(JobRow.status == JobStatus.queued, JobRow.id > after_id)
        .order_by(JobRow.id)
        .limit(limit)
    )
    if before is not None:
        query = query.where(JobRow.run_at <= before)
    return [Dispatch(i, q, p) for i, q, p in session.execute(query)]
