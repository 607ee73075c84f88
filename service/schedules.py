"""Schedule domain: create, read, change, delete, trigger, and fire due ticks. Plain
functions over a Session; the caller owns the transaction and dispatches the jobs after
commit (``Runtime.after_submit``).

Exactly once per tick, across replicas and without a leader: firing a tick inserts its
``schedule_fires`` row (primary key: schedule, tick) and its job in one transaction, and
advances ``next_fire_at`` in that same transaction. Replicas claim a due schedule with
``SELECT ... FOR UPDATE SKIP LOCKED``, so normally only one even tries; should two ever
race for one tick anyway, the second insert of the key fails and takes its job with it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.orm import Session

from service import errors, jobs, ticks
from service.ids import uuid7
from service.models import SCHEDULE_FIRES_TABLE, JobValues, ScheduleFireRow, ScheduleRow
from service.schemas import (
    CatchUp,
    JobSubmit,
    JobTemplate,
    ScheduleCreate,
    ScheduleUpdate,
)
from service.serialize import iso

log = logging.getLogger("celeriac.schedules")

# Fire rows only guard against racing replicas, which race for recent ticks: older ones
# are pruned as each schedule fires, so the table holds about a day per schedule.
FIRE_RETENTION = timedelta(days=1)
# Changing any of these moves the ticks: next_fire_at is planned again from now.
TIMING_FIELDS = ("cron", "every", "timezone", "start_at", "end_at", "enabled")


# --- validation ------------------------------------------------------------------------


def check_spec(spec: ScheduleCreate, where: str = "body") -> None:
    """What the models cannot check alone: the cron text, the zone, the pairings.
    Raises ValidationFailed (422) listing every problem."""
    problems: list[dict[str, Any]] = []

    def problem(field: str | None, message: str, kind: str) -> None:
        location = f"{where}.{field}" if field else where
        problems.append({"location": location, "message": message, "type": kind})

    if (spec.cron is None) == (spec.every is None):
        problem(None, "give exactly one of cron and every", "schedule_timing")
    if spec.cron is not None:
        try:
            ticks.cron_expression(spec.cron)
        except ValueError as exc:
            problem("cron", str(exc), "cron")
    try:
        ticks.zone(spec.timezone)
    except ValueError as exc:
        problem("timezone", str(exc), "timezone")
    if spec.start_at and spec.end_at and spec.end_at <= spec.start_at:
        problem("end_at", "end_at must be after start_at", "schedule_window")
    if problems:
        summary = "; ".join(f"{p['location']}: {p['message']}" for p in problems)
        raise errors.ValidationFailed(summary, errors=problems)


# --- rows and bodies -------------------------------------------------------------------


def spec_of(row: ScheduleRow) -> ScheduleCreate:
    return ScheduleCreate(
        name=row.name,
        cron=row.cron,
        every=row.every_seconds,
        timezone=row.timezone,
        job=JobTemplate.model_validate(row.job),
        enabled=row.enabled,
        catch_up=CatchUp(row.catch_up),
        start_at=row.start_at,
        end_at=row.end_at,
    )


def _assign(row: ScheduleRow, spec: ScheduleCreate) -> None:
    row.cron = spec.cron
    row.every_seconds = spec.every
    row.timezone = spec.timezone
    row.job = spec.job.model_dump(mode="json")
    row.enabled = spec.enabled
    row.catch_up = spec.catch_up.value
    row.start_at = spec.start_at
    row.end_at = spec.end_at


def timing_of(row: ScheduleRow) -> ticks.Timing:
    return ticks.Timing(
        cron=row.cron,
        every=row.every_seconds,
        zone=row.timezone,
        # Interval ticks count from start_at, else from the schedule's creation.
        anchor=row.start_at or row.created_at,
        start_at=row.start_at,
        end_at=row.end_at,
    )


def _plan_from_now(row: ScheduleRow, now: datetime) -> None:
    """A new or re-timed schedule fires from its first tick after now: ticks before
    the change were never owed."""
    row.next_fire_at = timing_of(row).next_after(now) if row.enabled else None


def schedule_body(row: ScheduleRow) -> dict[str, Any]:
    return {
        "name": row.name,
        "cron": row.cron,
        "every": row.every_seconds,
        "timezone": row.timezone,
        "job": row.job,
        "enabled": row.enabled,
        "catch_up": row.catch_up,
        "start_at": iso(row.start_at),
        "end_at": iso(row.end_at),
        "next_fire_at": iso(row.next_fire_at),
        "last_fired_at": iso(row.last_fired_at),
        "last_job_id": row.last_job_id,
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
    }


# --- create, read, change, delete --------------------------------------------------------


def find_schedule(session: Session, name: str, *, for_update: bool = False) -> ScheduleRow | None:
    query = sa.select(ScheduleRow).where(ScheduleRow.name == name)
    if for_update:
        query = query.with_for_update()
    return session.scalars(query).first()


def get_schedule(session: Session, name: str, *, for_update: bool = False) -> ScheduleRow:
    row = find_schedule(session, name, for_update=for_update)
    if row is None:
        raise errors.ScheduleNotFound(f"no schedule is named {name!r}")
    return row


def list_schedules(session: Session) -> list[ScheduleRow]:
    return list(session.scalars(sa.select(ScheduleRow).order_by(ScheduleRow.name)))


def create_schedule(session: Session, spec: ScheduleCreate, now: datetime) -> ScheduleRow:
    """Raises ScheduleExists; a concurrent create of the same name that commits first
    surfaces as IntegrityError at flush (the caller maps it to the same 409)."""
    check_spec(spec)
    if find_schedule(session, spec.name) is not None:
        raise errors.ScheduleExists(f"a schedule named {spec.name!r} exists; PATCH it instead")
    row = ScheduleRow(id=uuid7(), name=spec.name, created_at=now, updated_at=now)
    _assign(row, spec)
    _plan_from_now(row, now)
    session.add(row)
    session.flush()
    return row


def merge_update(current: ScheduleCreate, update: ScheduleUpdate) -> ScheduleCreate:
    """``current`` with the fields ``update`` gives. Naming one of cron/every clears the
    other, so switching kinds is one field; null is refused where it means nothing."""
    changes = {field: getattr(update, field) for field in update.model_fields_set}
    for field in ("timezone", "job", "enabled", "catch_up"):
        if field in changes and changes[field] is None:
            raise errors.ValidationFailed(
                f"body.{field}: may not be null",
                errors=[{"location": f"body.{field}", "message": "may not be null",
                         "type": "null"}],
            )  # fmt: skip
    if changes.get("cron") is not None and "every" not in changes:
        changes["every"] = None
    if changes.get("every") is not None and "cron" not in changes:
        changes["cron"] = None
    merged = current.model_dump()
    merged.update(changes)
    merged["job"] = changes.get("job") or current.job
    try:
        return ScheduleCreate.model_validate(merged)
    except ValidationError as exc:  # the parts were valid alone; only a pairing can fail
        raise errors.ValidationFailed(str(exc)) from None


def apply_spec(row: ScheduleRow, spec: ScheduleCreate, now: datetime) -> bool:
    """Make ``row`` say ``spec``; False if it already did (nothing written). Only a
    change of timing plans the ticks again, so a restart that re-applies the schedules
    file neither skips nor repeats one."""
    check_spec(spec)
    current = spec_of(row)
    if current.model_dump() == spec.model_dump():
        return False
    retimed = any(getattr(current, f) != getattr(spec, f) for f in TIMING_FIELDS)
    _assign(row, spec)
    row.updated_at = now
    if retimed:
        _plan_from_now(row, now)
    return True


def update_schedule(
    session: Session, name: str, update: ScheduleUpdate, now: datetime
) -> ScheduleRow:
    row = get_schedule(session, name, for_update=True)
    apply_spec(row, merge_update(spec_of(row), update), now)
    session.flush()
    return row


def upsert_schedule(session: Session, spec: ScheduleCreate, now: datetime) -> str:
    """Create or bring up to date by name: 'created', 'updated' or 'unchanged'."""
    row = find_schedule(session, spec.name, for_update=True)
    if row is None:
        create_schedule(session, spec, now)
        return "created"
    changed = apply_spec(row, spec, now)
    session.flush()
    return "updated" if changed else "unchanged"


def delete_schedule(session: Session, name: str) -> None:
    row = get_schedule(session, name, for_update=True)
    # Explicit as well as ON DELETE CASCADE: SQLite enforces foreign keys only on request.
    session.execute(sa.delete(ScheduleFireRow).where(ScheduleFireRow.schedule_id == row.id))
    session.delete(row)
    session.flush()


# --- firing -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fired:
    """What one firing transaction did, for logs and for dispatch after commit."""

    schedule: str
    jobs: list[JobValues]
    dropped: int


def job_spec(template: dict[str, Any], now: datetime) -> JobSubmit:
    job = JobTemplate.model_validate(template)
    expires_at = None if job.expires_after is None else now + timedelta(seconds=job.expires_after)
    fields = job.model_dump(exclude={"expires_after", "retry_backoff"})
    return JobSubmit(**fields, retry_backoff=job.retry_backoff, expires_at=expires_at)


def _fire(
    session: Session,
    row: ScheduleRow,
    spec: JobSubmit,
    fire_times: list[datetime],
    now: datetime,
    defaults: jobs.Defaults,
    *,
    manual: bool = False,
) -> list[JobValues]:
    """One job per tick, each with its fire row, in the caller's transaction."""
    made = [jobs.new_job(spec, now, defaults) for _ in fire_times]
    if not made:
        return made
    jobs.insert_jobs(session, made)
    fires = [
        {"schedule_id": row.id, "fire_time": tick, "job_id": job["id"], "manual": manual,
         "fired_at": now}
        for tick, job in zip(fire_times, made, strict=True)
    ]  # fmt: skip
    session.execute(sa.insert(SCHEDULE_FIRES_TABLE), fires)
    row.last_fired_at = now
    row.last_job_id = made[-1]["id"]
    return made


def _unfired(session: Session, schedule_id: str, fire_times: list[datetime]) -> list[datetime]:
    """Drop ticks that already have a fire row: after a re-timing brought a fired tick
    back, firing it would only fail on the key."""
    if not fire_times:
        return fire_times
    fired = set(
        session.scalars(
            sa.select(ScheduleFireRow.fire_time).where(
                ScheduleFireRow.schedule_id == schedule_id,
                ScheduleFireRow.fire_time.between(fire_times[0], fire_times[-1]),
            )
        )
    )
    return [tick for tick in fire_times if tick not in fired]


def claim_due(session: Session, now: datetime) -> ScheduleRow | None:
    """The most overdue schedule no other replica is firing, locked until commit."""
    query = (
        sa.select(ScheduleRow)
        .where(ScheduleRow.next_fire_at <= now)
        .order_by(ScheduleRow.next_fire_at)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    return session.scalars(query).first()


def fire_next_due(
    session: Session, now: datetime, grace: timedelta, defaults: jobs.Defaults
) -> Fired | None:
    """Fire one due schedule's ticks (per its catch-up policy) and plan its next tick.
    None when no schedule is due, or every due one is being fired elsewhere."""
    row = claim_due(session, now)
    if row is None:
        return None
    assert row.next_fire_at is not None
    plan = ticks.plan_fires(timing_of(row), row.next_fire_at, now, CatchUp(row.catch_up), grace)
    made: list[JobValues] = []
    try:
        spec = job_spec(row.job, now)
    except ValidationError as exc:
        # Stored before a stricter release: skip its ticks rather than block the others.
        log.error("schedule %r: invalid job template, ticks skipped: %s", row.name, exc)
    else:
        made = _fire(session, row, spec, _unfired(session, row.id, plan.fires), now, defaults)
    row.next_fire_at = plan.next_fire_at
    session.execute(
        sa.delete(ScheduleFireRow).where(
            ScheduleFireRow.schedule_id == row.id,
            ScheduleFireRow.fire_time < now - FIRE_RETENTION,
        )
    )
    session.flush()
    return Fired(row.name, made, plan.dropped)


def trigger_schedule(
    session: Session, name: str, now: datetime, defaults: jobs.Defaults
) -> JobValues:
    """Fire now, outside the ticks (disabled schedules too); the ticks are unchanged."""
    row = get_schedule(session, name, for_update=True)
    spec = job_spec(row.job, now)
    (job,) = _fire(session, row, spec, [now], now, defaults, manual=True)
    session.flush()
    return job


def next_due_at(session: Session) -> datetime | None:
    """The earliest next_fire_at of any schedule: one look at the index."""
    earliest: datetime | None = session.scalar(sa.select(sa.func.min(ScheduleRow.next_fire_at)))
    return earliest
