"""Worker reports (complete, fail, release, ``POST /leases/report``): settle them, with
results too large for the row placed in the result store first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from service import errors, results
from service.jobs import get_job
from service.leases import Effects, Settle, SettleOutcome, keep_settled, settle
from service.models import JobRow, values_of
from service.runtime import Runtime
from service.schemas import Report
from service.states import LeaseProblem, Outcome


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

    def work(session: Session, effects: Effects) -> list[SettleOutcome]:
        outcomes = settle(session, reports, now, effects, key_id=key_id)
        keep_settled(session, effects, runtime.signals.is_waited)  # for waiters here
        return outcomes

    return await runtime.transact(work)


async def settle_one(
    runtime: Runtime, report: Settle, key_id: str, request_length: int | None
) -> JobRow:
    """One report; the job as it now is. A large result goes to the result store first
    (413 without a store); a report that does not settle deletes its file again."""
    [report], stored = await results.place(runtime, request_length, [report])
    now = runtime.clock.now()

    def work(session: Session, effects: Effects) -> JobRow:
        [outcome] = settle(session, [report], now, effects, key_id=key_id)
        raise_problem(report.id, outcome.problem)
        row = get_job(session, report.id)
        if report.id in effects.finished and runtime.signals.is_waited(report.id):
            effects.settled[report.id] = values_of(row)  # the waiter answers with it
        return row

    try:
        return await runtime.transact(work)
    except BaseException:
        await results.discard(runtime, stored)
        raise


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
