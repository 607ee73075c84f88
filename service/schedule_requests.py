"""Changing schedules over HTTP: each change is stored, then wakes this replica's
scheduler (the others see it within ``reconcile_interval_seconds``)."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import errors, schedules
from service.auth import Principal
from service.models import JobValues, ScheduleRow
from service.runtime import Runtime
from service.schemas import ScheduleCreate, ScheduleUpdate


def _visible(principal: Principal, row: ScheduleRow) -> bool:
    return principal.allows_queue(str(row.job.get("queue", "default")))


def _changed(runtime: Runtime) -> None:
    # This replica re-plans its sleep at once; the others see the change within
    # reconcile_interval_seconds, and any replica may fire the tick.
    runtime.signals.schedules.set()


async def visible_schedules(runtime: Runtime, principal: Principal) -> list[ScheduleRow]:
    """By name: those submitting to a queue the caller may use."""
    rows = await runtime.db.read(schedules.list_schedules)
    return [row for row in rows if _visible(principal, row)]


async def read_schedule(runtime: Runtime, principal: Principal, name: str) -> ScheduleRow:
    """One schedule; one submitting to a queue the caller may not use is not found."""
    row = await runtime.db.read(lambda session: schedules.get_schedule(session, name))
    if not _visible(principal, row):
        raise errors.ScheduleNotFound(f"no schedule is named {name!r}")
    return row


async def create(runtime: Runtime, spec: ScheduleCreate) -> ScheduleRow:
    def work(session: Session) -> ScheduleRow:
        return schedules.create_schedule(session, spec, runtime.clock.now())

    try:
        row = await runtime.db.run(work)
    except IntegrityError:  # a concurrent create of the same name committed first
        raise errors.ScheduleExists(f"a schedule named {spec.name!r} exists") from None
    _changed(runtime)
    return row


async def update(runtime: Runtime, name: str, change: ScheduleUpdate) -> ScheduleRow:
    def work(session: Session) -> ScheduleRow:
        return schedules.update_schedule(session, name, change, runtime.clock.now())

    row = await runtime.db.run(work)
    _changed(runtime)
    return row


async def delete(runtime: Runtime, name: str) -> None:
    await runtime.db.run(lambda session: schedules.delete_schedule(session, name))
    _changed(runtime)


async def trigger(runtime: Runtime, name: str) -> JobValues:
    """The schedule's job, submitted now, outside its ticks."""

    def work(session: Session) -> JobValues:
        return schedules.trigger_schedule(session, name, runtime.clock.now(), runtime.defaults)

    row = await runtime.db.run(work)
    await runtime.after_submit([row])
    return row
