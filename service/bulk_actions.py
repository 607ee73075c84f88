"""``POST /jobs/bulk``: retry, cancel or delete every job a filter selects, in bounded
batches so that a million matching jobs never hold the table for long.

Each batch is its own transaction: up to ``BATCH`` ids (``CANCEL_BATCH`` for a cancel)
are selected by keyset on the ``(status, id)`` index, one status at a time, locked,
changed by the same rules as the one-job commands (``jobs.requeued_values``,
``jobs.cancel_rows``; deleting is ``retention.delete_jobs``), committed, and their effects
applied (retried jobs are published, so waiting workers wake and the Redis index holds
them). Between batches other transactions run; a job another request changed meanwhile
no longer matches the ``status`` condition when its lock is granted, and is left alone.
``matched`` counts the jobs selected, ``changed`` those the action changed (a running job
already asked to stop is matched, not changed)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service import errors, jobs, results
from service.auth import Principal
from service.effects import Dispatch, Effects
from service.models import JOBS_TABLE, JobRow
from service.retention import delete_jobs
from service.runtime import Runtime
from service.schemas import BulkFilter, BulkRequest
from service.states import FINISHED, PENDING, RETRYABLE, JobStatus

log = logging.getLogger("celeriac.bulk")

# Jobs per transaction: the longest any row lock is held is one batch's work. A cancel
# changes whole rows one by one (each job's webhook outbox row, its workflow), a retry or
# delete all ids with one statement: a cancel batch is smaller for the same lock time.
BATCH = 1000
CANCEL_BATCH = 250

# The statuses each action applies to (the one-job commands' rules).
APPLIES_TO: dict[str, tuple[JobStatus, ...]] = {
    "retry": tuple(RETRYABLE),
    "cancel": (*PENDING, JobStatus.running),
    "delete": tuple(sorted(FINISHED)),
}


@dataclass(frozen=True, slots=True)
class Selection:
    """A validated filter: the statuses to walk and the other conditions."""

    action: str
    statuses: tuple[JobStatus, ...]
    queue: str | None
    task: str | None
    finished_before: datetime | None
    ids: tuple[str, ...] | None
    principal: Principal

    def where(self, status: JobStatus, after: str) -> list[sa.ColumnElement[bool]]:
        clauses = [JobRow.status == status, JobRow.id > after]
        if self.queue is not None:
            clauses.append(JobRow.queue == self.queue)
        elif self.principal.queues is not None:  # a restricted key: its queues only
            clauses.append(jobs.queue_filter(self.principal.queues))
        if self.task is not None:
            clauses.append(JobRow.task == self.task)
        if self.finished_before is not None:
            clauses.append(JobRow.finished_at < self.finished_before)
        if self.ids is not None:
            clauses.append(JobRow.id.in_(self.ids))
        return clauses


@dataclass(slots=True)
class Tally:
    matched: int = 0
    changed: int = 0
    longest_batch: float = 0.0  # seconds: the longest transaction (for the log)


def select(request: BulkRequest, principal: Principal) -> Selection:
    """The filter checked against the action: 422 for one that cannot match anything the
    action applies to, or that selects everything."""
    action, given = request.action, request.filter
    if not given.model_fields_set - {"status"} and given.status is None:
        raise errors.ValidationFailed(
            "filter: give at least one of status, queue, task, finished_before or ids "
            "(an empty filter would select every job)"
        )
    statuses = _statuses(action, given)
    if given.finished_before is not None and action == "cancel":
        raise errors.ValidationFailed(
            "filter.finished_before selects finished jobs; cancel applies to unfinished ones"
        )
    if given.queue is not None:
        principal.check_queue(given.queue)
    ids = None if given.ids is None else tuple(dict.fromkeys(given.ids))
    return Selection(action, statuses, given.queue, given.task, given.finished_before, ids,
                     principal)  # fmt: skip


def _statuses(action: str, given: BulkFilter) -> tuple[JobStatus, ...]:
    applies = APPLIES_TO[action]
    if given.status is None:
        return applies
    asked = [given.status] if isinstance(given.status, JobStatus) else given.status
    if not asked:
        raise errors.ValidationFailed("filter.status: give at least one status, or leave it out")
    wrong = [str(status) for status in asked if status not in applies]
    if wrong:
        raise errors.ValidationFailed(
            f"filter.status: {action} applies to {', '.join(applies)} jobs, not {', '.join(wrong)}"
        )
    return tuple(dict.fromkeys(asked))


async def run(runtime: Runtime, principal: Principal, request: BulkRequest) -> Tally:
    """The whole action, batch after batch; the tally of what matched and changed."""
    selection = select(request, principal)
    tally = Tally()
    started = time.monotonic()
    for status in selection.statuses:
        after = ""  # every id sorts after the empty string
        while True:
            began = time.monotonic()
            done = await _batch(runtime, selection, status, after)
            tally.longest_batch = max(tally.longest_batch, time.monotonic() - began)
            tally.matched += done.matched
            tally.changed += done.changed
            if done.last is None:
                break
            after = done.last
    log.info(
        "bulk %s: %d matched, %d changed in %.2f s (longest transaction %.1f ms)",
        selection.action, tally.matched, tally.changed, time.monotonic() - started,
        tally.longest_batch * 1000,
    )  # fmt: skip
    return tally


@dataclass(frozen=True, slots=True)
class Batch:
    matched: int
    changed: int
    last: str | None  # the keyset position to go on from; None: this status is done
    stored: Sequence[str] = ()  # result-store keys to delete after commit


async def _batch(runtime: Runtime, selection: Selection, status: JobStatus, after: str) -> Batch:
    now = runtime.clock.now()

    def work(session: Session, effects: Effects) -> Batch:
        if selection.action == "cancel":
            return _cancel_batch(session, effects, selection, status, after, now)
        return _set_batch(session, effects, selection, status, after, now)

    done = await runtime.transact(work)
    await results.discard(runtime, done.stored)  # the deleted jobs' stored results
    return done


def _cancel_batch(
    session: Session, effects: Effects, selection: Selection, status: JobStatus, after: str,
    now: datetime,
) -> Batch:  # fmt: skip
    """Whole rows: a cancel writes each job's webhook outbox row, as the one-job cancel."""
    rows = _locked(session, selection, status, after)
    visible = [row for row in rows if selection.principal.allows_queue(row.queue)]
    changed = _cancel(session, visible, now, effects)
    session.flush()
    return Batch(len(visible), changed, _next(rows))


def _set_batch(
    session: Session, effects: Effects, selection: Selection, status: JobStatus, after: str,
    now: datetime,
) -> Batch:  # fmt: skip
    """Retry and delete: the ids locked, then one set-based statement for all of them."""
    keys = session.execute(
        sa.select(JobRow.id, JobRow.queue, JobRow.priority)
        .where(*selection.where(status, after))
        .order_by(JobRow.id)
        .limit(BATCH)
        .with_for_update()
    ).all()
    chosen = [key for key in keys if selection.principal.allows_queue(key.queue)]
    ids = [key.id for key in chosen]
    last = keys[-1].id if len(keys) >= BATCH else None
    if selection.action == "delete":
        return Batch(len(ids), len(ids), last, delete_jobs(session, ids))
    if ids:
        requeue = sa.update(JOBS_TABLE).where(JOBS_TABLE.c.id.in_(ids))
        session.execute(requeue.values(jobs.requeued_values(now)))
    # Published like any job that became ready (the broker reads what it needs).
    effects.dispatch += [Dispatch(key.id, key.queue, key.priority) for key in chosen]
    return Batch(len(ids), len(ids), last)


def _locked(session: Session, selection: Selection, status: JobStatus, after: str) -> list[JobRow]:
    query = (
        sa.select(JobRow)
        .where(*selection.where(status, after))
        .order_by(JobRow.id)
        .limit(CANCEL_BATCH)
        .with_for_update()
    )
    return list(session.scalars(query))


def _next(rows: Sequence[JobRow]) -> str | None:
    return rows[-1].id if len(rows) >= CANCEL_BATCH else None


def _cancel(session: Session, rows: Sequence[JobRow], now: datetime, effects: Effects) -> int:
    # A running job already asked to stop is not asked again (not a change).
    fresh = [row for row in rows if not (row.status == JobStatus.running and row.cancel_requested)]
    cancelled = jobs.cancel_rows(session, fresh, now, effects)
    effects.finished += [row.id for row in cancelled]  # as the one-job cancel does
    return len(fresh)
