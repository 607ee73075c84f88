"""Webhook domain: the durable outbox (docs/webhooks.md). Plain functions over a Session;
the caller owns the transaction.

A delivery row is written in the same transaction that gives its job a final state, so
a crash between the commit and the HTTP call delays the callback but never loses it. The
delivery loop (``service.webhook_delivery``) claims due rows with SKIP LOCKED, so every
replica can run one; an attempt in flight holds its row by pushing ``next_attempt_at``
past the request's deadline, so a replica that dies mid-attempt lets the row fall due
again (at-least-once: receivers deduplicate on ``webhook-id``).

This module must not import ``service.jobs`` or ``service.leases``: they import it."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service import errors
from service.ids import is_job_id, uuid7
from service.models import ATTEMPTS_TABLE, DELIVERIES_TABLE, JOBS_TABLE, JobValues
from service.serialize import iso
from service.states import FINISHED

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"  # gave up: retries exhausted, or the address was refused
GONE = "gone"  # the receiver answered 410: it wants no more
ERROR_MAX_CHARS = 1000
URL_MAX_CHARS = 2000  # webhook_deliveries.url
# What no text column of PostgreSQL can hold (NUL), with the other C0 controls, DEL and
# lone surrogates (not encodable as UTF-8), which no URL may contain either.
_UNSTORABLE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")

deliveries_c = DELIVERIES_TABLE.c
attempts_c = ATTEMPTS_TABLE.c


class Wakes(Protocol):
    """The part of ``leases.Effects`` this module touches (a Protocol, not an import:
    leases imports this module)."""

    deliveries: int


def _delivery(job_id: str, status: str, url: object, now: datetime) -> dict[str, Any]:
    stored, refused = storable_url(url)
    return {
        "id": uuid7(),
        "job_id": job_id,
        "event": f"job.{status}",
        "url": stored,
        # A URL the outbox cannot hold could never be delivered: recorded as given up,
        # rather than failing the transaction that finishes the job (and every other
        # job of its batch or sweep).
        "status": PENDING if refused is None else FAILED,
        "attempts": 0,
        "next_attempt_at": now if refused is None else None,
        "last_status_code": None,
        "last_error": refused,
        "created_at": now,
        "updated_at": now,
    }


def storable_url(url: object) -> tuple[str, str | None]:
    """The webhook URL as the outbox can store it (no control characters, which
    PostgreSQL refuses in text, at most the column's length), and why it cannot be
    delivered (None: it can). Only a URL stored before submits refused these gets here."""
    if not isinstance(url, str):
        return repr(url)[:URL_MAX_CHARS], "the webhook URL is not a string"
    escaped = _UNSTORABLE.sub(lambda m: f"%{ord(m.group()):02X}", url)
    if escaped != url:
        return escaped[:URL_MAX_CHARS], "the webhook URL contains control characters"
    if len(url) > URL_MAX_CHARS:
        return url[:URL_MAX_CHARS], f"the webhook URL is longer than {URL_MAX_CHARS} characters"
    return url, None


def record_finished(
    session: Session, changes: Iterable[JobValues], now: datetime, effects: Wakes | None
) -> int:
    """Queue a delivery for each job in ``changes`` (dicts with id, status, webhook) that
    reached a final status its webhook subscribes to. One executemany; nothing at all
    when no job has a webhook (the common case on the hot path)."""
    rows = []
    for change in changes:
        hook = change.get("webhook")
        status = str(change["status"])
        if not isinstance(hook, dict):  # none (or, stored by hand, not an object)
            continue
        if status in FINISHED and status in hook.get("events", ()):
            rows.append(_delivery(change["id"], status, hook["url"], now))
    if rows:
        session.execute(sa.insert(DELIVERIES_TABLE), rows)
        if effects is not None:
            effects.deliveries += len(rows)
    return len(rows)


def _job_state(session: Session, job_id: str) -> tuple[str, Any]:
    """The job's status and webhook; 404 if there is no such job."""
    if not is_job_id(job_id):
        raise errors.JobNotFound(f"no job has id {job_id!r}")
    row = session.execute(
        sa.select(JOBS_TABLE.c.status, JOBS_TABLE.c.webhook).where(JOBS_TABLE.c.id == job_id)
    ).first()
    if row is None:
        raise errors.JobNotFound(f"no job has id {job_id!r}")
    return row.status, row.webhook


def redeliver(session: Session, job_id: str, now: datetime, effects: Wakes) -> dict[str, Any]:
    """A new delivery (new webhook-id) of the job's final event, due now, whatever the
    webhook's events filter says: an operator asked for it."""
    status, webhook = _job_state(session, job_id)
    if status not in FINISHED:
        raise errors.JobNotFinished(
            f"job {job_id} is {status}; only a finished job has an event to deliver"
        )
    if not webhook:
        raise errors.NoWebhook(f"job {job_id} has no webhook to deliver to")
    row = _delivery(job_id, status, webhook["url"], now)
    session.execute(sa.insert(DELIVERIES_TABLE), [row])
    effects.deliveries += 1
    return delivery_body(row, [])


def list_deliveries(session: Session, job_id: str) -> list[dict[str, Any]]:
    _job_state(session, job_id)
    deliveries = [
        dict(row._mapping)
        for row in session.execute(
            sa.select(DELIVERIES_TABLE)
            .where(deliveries_c.job_id == job_id)
            .order_by(deliveries_c.id)
        )
    ]
    attempts: dict[str, list[dict[str, Any]]] = {d["id"]: [] for d in deliveries}
    if deliveries:
        for attempt in session.execute(
            sa.select(ATTEMPTS_TABLE)
            .where(attempts_c.delivery_id.in_(list(attempts)))
            .order_by(attempts_c.at, attempts_c.id)
        ):
            attempts[attempt.delivery_id].append(
                {
                    "at": iso(attempt.at),
                    "status_code": attempt.status_code,
                    "latency_ms": attempt.latency_ms,
                    "error": attempt.error,
                }
            )
    return [delivery_body(d, attempts[d["id"]]) for d in deliveries]


def delivery_body(row: dict[str, Any], attempts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "job_id": row["job_id"],
        "event": row["event"],
        "url": row["url"],
        "status": row["status"],
        "next_attempt_at": iso(row["next_attempt_at"]),
        "last_status_code": row["last_status_code"],
        "last_error": row["last_error"],
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
        "attempts": attempts,
    }


# --- the delivery loop's side -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    """A due delivery held by this process until ``held_until`` (its fencing value)."""

    id: str
    job_id: str
    event: str
    url: str
    attempts: int
    created_at: datetime
    held_until: datetime
    job: JobValues | None


def claim_due(session: Session, now: datetime, limit: int, hold_seconds: float) -> list[Claim]:
    """Take up to ``limit`` due deliveries, oldest due first; SKIP LOCKED lets replicas
    pass each other. The claim is pushing ``next_attempt_at`` to ``now + hold_seconds``."""
    rows = session.execute(
        sa.select(
            deliveries_c.id,
            deliveries_c.job_id,
            deliveries_c.event,
            deliveries_c.url,
            deliveries_c.attempts,
            deliveries_c.created_at,
        )
        .where(deliveries_c.status == PENDING, deliveries_c.next_attempt_at <= now)
        .order_by(deliveries_c.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    if not rows:
        return []
    held_until = now + timedelta(seconds=hold_seconds)
    session.execute(
        sa.update(DELIVERIES_TABLE)
        .where(deliveries_c.id.in_([r.id for r in rows]))
        .values(next_attempt_at=held_until, updated_at=now)
    )
    # The payload is the job as it is now (a finished job no longer changes, unless an
    # operator retried it).
    jobs = {
        job.id: cast(JobValues, dict(job._mapping))
        for job in session.execute(
            sa.select(JOBS_TABLE).where(JOBS_TABLE.c.id.in_({r.job_id for r in rows}))
        )
    }
    return [
        Claim(
            id=r.id,
            job_id=r.job_id,
            event=r.event,
            url=r.url,
            attempts=r.attempts,
            created_at=r.created_at,
            held_until=held_until,
            job=jobs.get(r.job_id),
        )
        for r in rows
    ]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to, and what the delivery becomes."""

    at: datetime
    status_code: int | None
    latency_ms: int
    error: str | None
    status: str  # pending (retry at next_attempt_at), delivered, failed, gone
    next_attempt_at: datetime | None


def record_attempt(session: Session, claim: Claim, outcome: Outcome) -> bool:
    """Log the attempt and move the delivery on. Fenced on the claim: if the hold ran out
    and another replica took the delivery, only the attempt is logged. Returns whether the
    delivery row was updated."""
    error = None if outcome.error is None else outcome.error[:ERROR_MAX_CHARS]
    session.execute(
        sa.insert(ATTEMPTS_TABLE).values(
            id=uuid7(),
            delivery_id=claim.id,
            at=outcome.at,
            status_code=outcome.status_code,
            latency_ms=outcome.latency_ms,
            error=error,
        )
    )
    updated = session.execute(
        sa.update(DELIVERIES_TABLE)
        .where(
            deliveries_c.id == claim.id,
            deliveries_c.status == PENDING,
            deliveries_c.next_attempt_at == claim.held_until,
        )
        .values(
            status=outcome.status,
            attempts=deliveries_c.attempts + 1,
            next_attempt_at=outcome.next_attempt_at,
            last_status_code=outcome.status_code,
            last_error=error,
            updated_at=outcome.at,
        )
    )
    return bool(getattr(updated, "rowcount", 0) == 1)


def next_due(session: Session) -> datetime | None:
    """When the delivery loop next has work (index on status, next_attempt_at)."""
    value: datetime | None = session.scalar(
        sa.select(sa.func.min(deliveries_c.next_attempt_at)).where(deliveries_c.status == PENDING)
    )
    return value
