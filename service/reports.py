"""Worker reports (complete, fail, release, ``POST /leases/report``): settle them, with
results too large for the row placed in the result store first."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from service import errors, flow, results
from service.jobs import get_job
from service.leases import (
    Effects,
    Settle,
    SettleOutcome,
    keep_settled,
    settle,
    settle_succeeded_direct,
    settle_succeeded_sqlite,
    settles_directly,
)
from service.models import JobValues, values_of
from service.pg_direct import DirectPg, Refused
from service.runtime import Runtime
from service.schemas import Report
from service.sqlite_direct import DirectSqlite
from service.states import JobStatus, LeaseProblem, Outcome


def raise_problem(job_id: str, problem: str | None) -> None:
    """A report or heartbeat that changed nothing, as its problem (404 or 409)."""
    if problem is None:
        return
    if problem == LeaseProblem.stale:
        raise errors.StaleLease(
            f"job {job_id} is no longer leased with this token (the lease expired and was "
            "re-granted, or the job was settled): drop it, the report changed nothing"
        )
    raise errors.JobNotFound(f"no job has id {job_id!r}")


async def settle_many(runtime: Runtime, reports: list[Settle], key_id: str) -> list[SettleOutcome]:
    now = runtime.clock.now()
    direct = await _settle_direct(runtime, reports, now, key_id)
    rest = [report for report in reports if report.id not in direct]

    def work(session: Session, effects: Effects) -> list[SettleOutcome]:
        outcomes = settle(session, rest, now, effects, key_id=key_id)
        keep_settled(session, effects, runtime.signals.is_waited)  # for waiters here
        return outcomes

    others = iter(await runtime.transact(work, rows=len(rest)) if rest else [])
    return [
        SettleOutcome(r.id, None, JobStatus.succeeded) if r.id in direct else next(others)
        for r in reports
    ]


async def settle_one(
    runtime: Runtime, report: Settle, key_id: str, request_length: int | None
) -> JobValues:
    """One report; the job as it now is. A large result goes to the result store first
    (413 without a store); a report that does not settle deletes its file again."""
    [report], stored = await results.place(runtime, request_length, [report])
    now = runtime.clock.now()

    def work(session: Session, effects: Effects) -> JobValues:
        [outcome] = settle(session, [report], now, effects, key_id=key_id)
        raise_problem(report.id, outcome.problem)
        row = values_of(get_job(session, report.id))
        if report.id in effects.finished and runtime.signals.is_waited(report.id):
            effects.settled[report.id] = row  # the waiter answers with it
        return row

    try:
        direct = await _settle_direct(runtime, [report], now, key_id, whole=True)
        if report.id in direct:
            return direct[report.id]
        return await runtime.transact(work, rows=1)
    except BaseException:
        await results.discard(runtime, stored)
        raise


async def _settle_direct(
    runtime: Runtime, reports: list[Settle], now: datetime, key_id: str, *, whole: bool = False
) -> dict[str, JobValues]:
    """The successes settled in one statement from the event loop (PostgreSQL,
    ``settles_directly``; service/pg_direct.py; on SQLite a short batch, a statement
    each: service/sqlite_direct.py), their effects applied: the jobs as they now are
    (``whole``: every column, else what the effects need). The rest, and all of a batch
    that names a job twice (the first report settles it, which is ``settle``'s to
    decide), are left to ``settle``."""
    direct = runtime.loop_direct
    if direct is None:
        return {}
    candidates = [report for report in reports if settles_directly(report)]
    if not candidates or len({report.id for report in reports}) < len(reports):
        return {}
    if not direct.takes(len(candidates)):
        return {}
    if isinstance(direct, DirectSqlite):
        # Under flow control, jobs in queues with limits of their own hold a slot: not
        # here (SQLite's statement leaves the jobs that name limits).
        engine = runtime.db.engine
        if flow.active(engine) and flow.limited_queues(engine) != frozenset():
            return {}
        return await _settled_on_sqlite(runtime, direct, candidates, now, key_id, whole)
    assert isinstance(direct, DirectPg)
    effects = Effects()
    # What the broker tells other replicas, in the statement's own transaction (a NOTIFY
    # for the SQL broker); for a job the statement leaves, a wake-up too many, harmless.
    notices = runtime.broker.commit_notices(Effects(finished=[r.id for r in candidates]))
    try:
        settled = await settle_succeeded_direct(
            direct, candidates, now, effects, key_id=key_id,
            waited=runtime.signals.is_waited, notices=notices, whole=whole,
            with_limits=True,
        )  # fmt: skip
    except Refused:  # nothing committed: all of them through the pool
        return {}
    effects.announced = bool(notices)
    if settled:
        # The slots they held (limits of their own, or their queue's) are free.
        await flow.freed_after_commit(runtime.db, settled.values(), effects)
        await runtime.apply(effects)
    return settled


async def _settled_on_sqlite(
    runtime: Runtime,
    direct: DirectSqlite,
    candidates: list[Settle],
    now: datetime,
    key_id: str,
    whole: bool,
) -> dict[str, JobValues]:
    effects = Effects()
    try:
        settled = await settle_succeeded_sqlite(
            direct, candidates, now, effects, key_id=key_id,
            waited=runtime.signals.is_waited, whole=whole,
        )  # fmt: skip
    except Refused:  # nothing committed: all of them through the pool
        return {}
    if settled:
        await runtime.apply(effects)
    return settled


async def report_many(
    runtime: Runtime, items: Sequence[Report], key_id: str, request_length: int | None
) -> list[SettleOutcome]:
    """Settle a batch; each report has its own outcome, and a report that did not settle
    leaves no file in the result store."""
    reports = [_settle_of(item) for item in items]
    reports, stored = await results.place(runtime, request_length, reports)
    try:
        outcomes = await settle_many(runtime, reports, key_id)
    except BaseException:
        await results.discard(runtime, stored)
        raise
    unsettled = zip(reports, outcomes, strict=True)
    await results.discard(
        runtime, [r.result_ref for r, o in unsettled if o.problem and r.result_ref]
    )
    return outcomes


def _settle_of(item: Report) -> Settle:
    if item.outcome == Outcome.failed and item.error is None:
        raise errors.ValidationFailed(f"report for job {item.id}: a failure needs an error")
    error: dict[str, Any] | None = (
        None if item.error is None else item.error.model_dump(exclude_none=True)
    )
    outcome = Outcome(item.outcome)
    return Settle(
        item.id, item.token, outcome, item.result, error, item.retry, item.retry_in,
        logs=item.logs,
    )  # fmt: skip
