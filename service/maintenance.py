"""The maintenance plugins every replica runs (service/loops.py runs them):

- ``Maintenance``: promote due jobs, mark silent workers lost (which ends their leases),
  reclaim expired leases, expire stale jobs (one transaction per batch; a batch the
  database refuses is redone job by job, see ``_sweep_one_by_one``), then repair the
  dispatch index (``reconcile_index``). It is due at the next deadline (a job's
  ``run_at``, a lease or a worker running out, an ``expires_at``), is woken by
  ``Signals.maintenance``, and ``reconcile_interval_seconds`` bounds its sleep, so a lost
  Redis push or a replica's unannounced timer is repaired within that bound.
- ``ClockRefresh``: re-measure the offset to the database's clock every minute.
"""

from __future__ import annotations

import logging
from datetime import datetime
from functools import partial

from sqlalchemy.orm import Session

from service import workers
from service.effects import Effects
from service.isolation import is_row_error, reason
from service.leases import (
    BATCH_LIMIT,
    Scope,
    expire_pending,
    next_deadline,
    promote_due,
    reclaim_expired_leases,
    set_aside,
    sweep_candidates,
)
from service.loops import Pass, Plugin
from service.runtime import Runtime

log = logging.getLogger("celeriac.maintenance")

CLOCK_REFRESH_SECONDS = 60.0


def _sweep(
    session: Session, effects: Effects, now: datetime, retention: float, scope: Scope
) -> int:
    return (
        promote_due(session, now, effects, scope)
        # A lost worker's leases end now: the next pass (at once) reclaims them.
        + (workers.mark_lost(session, now, retention) if scope.only is None else 0)
        + reclaim_expired_leases(session, now, effects, scope)
        + expire_pending(session, now, effects, scope)
    )


class SetAside:
    """Jobs no sweep could process, even alone, and that could not be failed either:
    skipped by every later pass of this process (each is logged once)."""

    def __init__(self) -> None:
        self.ids: frozenset[str] = frozenset()

    def add(self, job_id: str) -> None:
        self.ids |= {job_id}


def _next_due(session: Session, skip: frozenset[str]) -> datetime | None:
    due = [d for d in (next_deadline(session, skip), workers.next_due(session)) if d is not None]
    return min(due) if due else None


async def sweep(runtime: Runtime, aside: SetAside) -> int:
    """One batch of every sweep; how many jobs (and workers) it changed."""
    now = runtime.clock.now()
    retention = runtime.settings.worker_lost_retention_seconds
    scope = Scope(skip=aside.ids)
    try:
        return await runtime.transact(partial(_sweep, now=now, retention=retention, scope=scope))
    except Exception as exc:
        if not is_row_error(exc):
            raise  # an outage, or a bug: the pass fails and the loop backs off
        return await _sweep_one_by_one(runtime, now, retention, aside)


async def reconcile_index(runtime: Runtime) -> None:
    """The one call into the broker's repair of its dispatch index (what the broker
    offers for it may change: adapt it here)."""
    await runtime.broker.reconcile(runtime.clock.now())


async def _sweep_one_by_one(
    runtime: Runtime, now: datetime, retention: float, aside: SetAside
) -> int:
    """The batch failed on a row the database refused: sweep each job in a transaction of
    its own, so that every other job is promoted, reclaimed or expired, and set aside the
    job that still fails."""
    await runtime.transact(lambda session, effects: workers.mark_lost(session, now, retention))
    skip = aside.ids
    ids = await runtime.db.read(
        lambda session: sweep_candidates(session, now, Scope(skip=skip), BATCH_LIMIT)
    )
    changed = 0
    for job_id in ids:
        one = Scope(only=(job_id,))
        try:
            changed += await runtime.transact(
                partial(_sweep, now=now, retention=retention, scope=one)
            )
        except Exception as exc:
            if not is_row_error(exc):
                raise
            await _set_aside(runtime, job_id, now, exc, aside)
    return changed


async def _set_aside(
    runtime: Runtime, job_id: str, now: datetime, exc: Exception, aside: SetAside
) -> None:
    """Fail the job, saying why; if even that is refused, skip it from now on. One log
    line either way: it is not due again. (The job's error names only the error class:
    the database's message may name the schema, and any read key sees the job.)"""
    public = f"the database refused a value it holds ({type(getattr(exc, 'orig', exc)).__name__})"
    try:
        failed = await runtime.transact(
            lambda session, effects: set_aside(session, job_id, now, public, effects)
        )
    except Exception as again:
        if not is_row_error(again):
            raise
        failed = False
    if failed:
        log.error("job %s: maintenance could not process it (%s); marked it failed",
                  job_id, reason(exc))  # fmt: skip
        return
    aside.add(job_id)
    log.error(
        "job %s: maintenance could not process it (%s) nor mark it failed; skipped by this "
        "process from now on",
        job_id,
        reason(exc),
    )


class Maintenance(Plugin):
    name = "maintenance"

    def __init__(self, runtime: Runtime) -> None:
        self.interval = runtime.settings.reconcile_interval_seconds
        self.wakes = (runtime.signals.maintenance,)
        self.aside = SetAside()

    async def run_once(self, runtime: Runtime) -> Pass:
        signals = runtime.signals
        try:
            changed = await sweep(runtime, self.aside)
            await reconcile_index(runtime)
            if changed >= BATCH_LIMIT:
                return Pass(more=True)  # more of the same is waiting
            upcoming = await runtime.db.read(partial(_next_due, skip=self.aside.ids))
        except Exception:
            signals.earliest_due = None  # until a pass succeeds, anything due wakes it
            raise
        signals.earliest_due = upcoming  # what Signals.due_at compares a new deadline with
        return Pass(due=upcoming)


class ClockRefresh(Plugin):
    """Delays and lease deadlines are instants on the database's clock: follow its drift."""

    name = "clock"
    interval = CLOCK_REFRESH_SECONDS

    async def run_once(self, runtime: Runtime) -> Pass:
        await runtime.db.read(runtime.clock.measure)
        return Pass()
