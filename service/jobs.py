"""Job domain: submit, read, list, cancel, retry. Plain functions over a Session; the
caller owns the transaction and does broker side effects after commit."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service import bulk, errors, workflows
from service.auth import Principal
from service.effects import Dispatch, Effects, Ended
from service.ids import floor_of, is_job_id, uuid7
from service.models import JOBS_TABLE, JobRow, JobValues
from service.schemas import JobSubmit, WebhookSpec
from service.states import FINISHED, RETRYABLE, JobStatus
from service.webhooks import record_finished


@dataclass(frozen=True, slots=True)
class Defaults:
    max_retries: int
    # The queues' default webhooks, and the result TTL in seconds (None: forever).
    webhooks: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    result_ttl: float | None = None


def dispatch_of(row: JobRow) -> Dispatch:
    return Dispatch(row.id, row.queue, row.priority)


def dispatch_of_values(values: JobValues) -> Dispatch:
    return Dispatch(values["id"], values["queue"], values["priority"], values)


def request_hash(spec: JobSubmit) -> str:
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# What a new job holds in the columns ``new_job`` does not set: NULL. Every row then has
# every column, so the rows that one INSERT stores are alike, whoever else added to some.
NULL_COLUMNS: dict[str, None] = dict.fromkeys(
    column.key for column in JOBS_TABLE.columns if column.nullable and column.server_default is None
)


def new_job(
    spec: JobSubmit, now: datetime, defaults: Defaults, job_id: str | None = None
) -> JobValues:
    """The column values of a submitted job. Plain values, not an ORM object: submits
    insert them in bulk, and the response is built from them without a read back.
    ``job_id``: one of ``ids.uuid7s`` for a batch (else a fresh ``uuid7``)."""
    if spec.delay is not None and spec.run_at is not None:
        raise errors.ValidationFailed("give either delay or run_at, not both")
    if spec.delay:
        run_at = now + timedelta(seconds=spec.delay)
    elif spec.run_at is not None:
        run_at = max(spec.run_at, now)
    else:
        run_at = now
    backoff = spec.retry_backoff
    webhook = defaults.webhooks.get(spec.queue) if spec.webhook is None else spec.webhook
    result_ttl = defaults.result_ttl if spec.result_ttl is None else spec.result_ttl
    # A literal, not dict(): a call with forty keyword arguments cost a third more.
    return cast(JobValues, NULL_COLUMNS | {
        "id": uuid7() if job_id is None else job_id,
        "task": spec.task,
        "queue": spec.queue,
        "priority": spec.priority,
        "status": JobStatus.scheduled if run_at > now else JobStatus.queued,
        "args": spec.args,
        "kwargs": spec.kwargs,
        "attempt": 0,
        "max_retries": defaults.max_retries if spec.max_retries is None else spec.max_retries,
        "backoff_base": 1.0 if backoff is None else backoff.base,
        "backoff_max": 300.0 if backoff is None else backoff.max,
        "backoff_jitter": True if backoff is None else backoff.jitter,
        "timeout": spec.timeout,
        "run_at": run_at,
        "expires_at": spec.expires_at,
        "cancel_requested": False,
        "created_at": now,
        "lease_token": None,
        "lease_worker": None,
        "lease_expires_at": None,
        "lease_key": None,
        "result": None,
        "error": None,
        "progress": None,
        "idempotency_key": None,
        "request_hash": None,
        "started_at": None,
        "finished_at": None,
        "webhook": webhook.model_dump() if isinstance(webhook, WebhookSpec) else webhook,
        "result_ttl": result_ttl or None,  # 0 keeps the result forever
        "result_ref": None,
        "result_expires_at": None,
        "result_expired": False,
        "limits": spec.limits or None,  # flow control (service/flow.py)
        "limit_key": spec.limits[0] if spec.limits else None,
    })  # fmt: skip


def insert_jobs(session: Session, rows: list[JobValues]) -> None:
    """One INSERT for all ``rows`` (every row with the same keys, as ``new_job`` makes
    them), in Core: not the ORM's unit of work, which costs more than the insert."""
    bulk.insert_each(session, rows)


# --- idempotency: per API key, for CELERIAC_IDEMPOTENCY_TTL_SECONDS ------------------------


def scoped_idempotency_key(key_id: str, key: str) -> str:
    """What the ``idempotency_key`` column holds: the client's key as it is with auth off
    (one tenant, as before), else ``<key_id>:<sha256 of the key>`` so that two API keys'
    identical keys are two entries and neither can see or squat the other's. Hashed
    because key_id plus a 255-character header would not fit the 255-character column."""
    if not key_id:
        return key
    return f"{key_id}:{hashlib.sha256(key.encode()).hexdigest()}"


def get_job(
    session: Session,
    job_id: str,
    *,
    for_update: bool = False,
    visible_to: Principal | None = None,
) -> JobRow:
    """The job; with ``visible_to``, only if that caller may use its queue (another
    tenant's job reads as missing: its existence is not revealed)."""
    if not is_job_id(job_id):
        raise not_found(job_id)
    query = sa.select(JobRow).where(JobRow.id == job_id)
    if for_update:
        query = query.with_for_update()
    row = session.scalars(query).first()
    if row is None or (visible_to is not None and not visible_to.allows_queue(row.queue)):
        raise not_found(job_id)
    return row


def not_found(job_id: str) -> errors.JobNotFound:
    return errors.JobNotFound(f"no job has id {job_id!r}")


@functools.cache
def by_id() -> sa.Select[Any]:
    """Every column of the job ``:job_id``: built once (building costs more than running)."""
    return sa.select(JOBS_TABLE).where(JOBS_TABLE.c.id == sa.bindparam("job_id"))


def check_visible(session: Session, job_id: str, principal: Principal) -> None:
    """JobNotFound unless ``principal`` may see the job. Free for an unrestricted key."""
    if principal.queues is None:
        return
    queue = session.scalar(sa.select(JobRow.queue).where(JobRow.id == job_id))
    if queue is None or not principal.allows_queue(queue):
        raise not_found(job_id)


def check_queues(principal: Principal, queues: Iterable[str], what: str = "jobs") -> None:
    """403 naming the first queue (and its index) the caller's key may not use."""
    if principal.queues is None:
        return
    for index, queue in enumerate(queues):
        if not principal.allows_queue(queue):
            raise errors.Forbidden(f"{what}[{index}]: this API key may not use queue {queue!r}")


def queue_filter(patterns: Iterable[str]) -> sa.ColumnElement[bool]:
    """A SQL prefilter for queues matching any of the fnmatch ``patterns``: ``*`` and
    ``?`` become LIKE wildcards, a ``[...]`` class one ``_``. LIKE ignores case on SQLite
    and MariaDB, so this may let through a few more: callers filter again exactly."""
    clauses = []
    for pattern in patterns:
        like = []
        for part in re.split(r"(\[[^\]]*\])", pattern):
            if part.startswith("[") and part.endswith("]") and len(part) > 2:
                like.append("_")
                continue
            escaped = part.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            like.append(escaped.replace("*", "%").replace("?", "_"))
        clauses.append(JobRow.queue.like("".join(like), escape="\\"))
    return sa.or_(sa.false(), *clauses)


def encode_cursor(job_id: str) -> str:
    return base64.urlsafe_b64encode(job_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        job_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        job_id = ""
    if not is_job_id(job_id):
        raise errors.InvalidCursor("the cursor is not one this service issued; start over")
    return job_id


@dataclass(frozen=True, slots=True)
class IdWindow:
    """A range of the time-ordered primary key: jobs created in ``[after, before)`` and
    whose id starts with ``prefix`` (the dashboard's filters). A range scan of the key,
    never a scan of the table."""

    after: datetime | None = None
    before: datetime | None = None
    prefix: str | None = None

    def conditions(self) -> list[sa.ColumnElement[bool]]:
        found: list[sa.ColumnElement[bool]] = []
        if self.after is not None:
            found.append(JobRow.id >= floor_of(self.after))
        if self.before is not None:
            found.append(JobRow.id < floor_of(self.before))
        if self.prefix:
            # "~" sorts after every hex digit and "-": the ids that start with the prefix.
            found += [JobRow.id >= self.prefix, JobRow.id < self.prefix + "~"]
        return found


def list_jobs(
    session: Session,
    *,
    status: JobStatus | None,
    queue: str | None,
    task: str | None,
    limit: int,
    cursor: str | None,
    principal: Principal | None = None,
    window: IdWindow | None = None,
) -> tuple[list[JobRow], str | None]:
    """Newest first, keyset-paginated on the time-ordered id. For a caller restricted to
    some queues: only jobs in those (a page may then hold fewer than ``limit`` jobs and
    still have a next cursor, where the SQL prefilter let others through)."""
    restricted = principal is not None and principal.queues is not None
    if principal is not None and queue is not None:
        principal.check_queue(queue)
    query = sa.select(JobRow).order_by(JobRow.id.desc()).limit(limit + 1)
    if restricted and queue is None:
        assert principal is not None and principal.queues is not None
        query = query.where(queue_filter(principal.queues))
    if status is not None:
        query = query.where(JobRow.status == status)
    if queue is not None:
        query = query.where(JobRow.queue == queue)
    if task is not None:
        query = query.where(JobRow.task == task)
    if cursor is not None:
        query = query.where(JobRow.id < decode_cursor(cursor))
    if window is not None:
        query = query.where(*window.conditions())
    rows = list(session.scalars(query))
    next_cursor = encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
    page = rows[:limit]
    if restricted:
        assert principal is not None
        page = [row for row in page if principal.allows_queue(row.queue)]
    return page, next_cursor


def cancel_job(
    session: Session,
    job_id: str,
    now: datetime,
    effects: Effects | None = None,
    visible_to: Principal | None = None,
) -> JobRow:
    row = get_job(session, job_id, for_update=True, visible_to=visible_to)
    if row.status in FINISHED:
        raise errors.JobFinished(f"job {job_id} is already {row.status}; nothing to cancel")
    cancel_rows(session, [row], now, effects)
    session.flush()
    return row


def cancel_rows(
    session: Session, rows: Iterable[JobRow], now: datetime, effects: Effects | None = None
) -> list[JobRow]:
    """Cancel locked, unfinished rows (one job's cancel, or a bulk one): a pending job now,
    a running one at its worker's next heartbeat. Returns the rows cancelled now."""
    cancelled: list[JobRow] = []
    for row in rows:
        if row.status == JobStatus.running:
            row.cancel_requested = True  # the worker hears of it at its next heartbeat
            if effects is not None:
                effects.cancelling.append(row.id)
        else:
            row.status = JobStatus.cancelled
            row.finished_at = now
            cancelled.append(row)
    if cancelled:  # the webhook outbox rows commit with the cancellation
        finished: list[JobValues] = [
            {"id": r.id, "status": r.status, "webhook": r.webhook} for r in cancelled
        ]
        record_finished(session, finished, now, effects)
        if any(r.workflow_id is not None for r in cancelled):  # what waits on them
            session.flush()
            workflows.on_finished(session, [{"id": r.id, "status": r.status,
                                  "workflow_id": r.workflow_id} for r in cancelled], now,
                                  effects)  # fmt: skip
        if effects is not None:  # for metrics, after commit
            effects.ended += [Ended(r.id, r.queue, r.task, JobStatus.cancelled, r.attempt,
                                    ended_at=now) for r in cancelled]  # fmt: skip
    return cancelled


def retry_job(
    session: Session, job_id: str, now: datetime, visible_to: Principal | None = None
) -> JobRow:
    """Queue a failed, cancelled or expired job again, with a fresh retry budget."""
    row = get_job(session, job_id, for_update=True, visible_to=visible_to)
    if row.status not in RETRYABLE:
        raise errors.JobNotRetryable(f"job {job_id} is {row.status}; it cannot be retried")
    requeue(row, now)
    session.flush()
    return row


def requeued_values(now: datetime) -> dict[str, Any]:
    """What a retry sets on a failed, cancelled or expired job: queued now, a fresh retry
    budget, nothing left of its last run; and an expiry already past is dropped. The one
    rule for one job's retry (``requeue``) and a bulk one (``POST /jobs/bulk``, a
    set-based UPDATE with these values)."""
    return {
        "status": JobStatus.queued,
        "attempt": 0,
        "run_at": now,
        "result": None,
        "error": None,
        "progress": None,
        "started_at": None,
        "finished_at": None,
        "cancel_requested": False,
        "expires_at": sa.case((JobRow.expires_at <= now, sa.null()), else_=JobRow.expires_at),
    }


def requeue(row: JobRow, now: datetime) -> None:
    """A locked failed, cancelled or expired row queued again (one job's retry)."""
    for column, value in requeued_values(now).items():
        if column != "expires_at":  # a SQL expression: decided here in Python instead
            setattr(row, column, value)
    if row.expires_at is not None and row.expires_at <= now:
        row.expires_at = None


def queue_stats(session: Session, principal: Principal | None = None) -> list[dict[str, Any]]:
    """Counts per queue (only the queues ``principal`` may use, when given)."""
    counts: dict[str, dict[str, int]] = {}
    for queue, status, count in session.execute(
        sa.select(JobRow.queue, JobRow.status, sa.func.count()).group_by(
            JobRow.queue, JobRow.status
        )
    ):
        counts.setdefault(queue, {})[status] = count
    oldest = dict(
        session.execute(
            sa.select(JobRow.queue, sa.func.min(JobRow.run_at))
            .where(JobRow.status == JobStatus.queued)
            .group_by(JobRow.queue)
        ).all()
    )
    return [
        {"name": name, "counts": counts[name], "oldest_queued_at": oldest.get(name)}
        for name in sorted(counts)
        if principal is None or principal.allows_queue(name)
    ]
