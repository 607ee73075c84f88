"""The maintenance loop every replica runs: promote due jobs, mark silent workers lost (which
ends their leases), reclaim expired leases, expire stale jobs, repair the dispatch index.
It sleeps until the next thing is due (or until woken), not on a fixed tick;
``reconcile_interval_seconds`` caps the sleep so a lost Redis push or a replica's
unannounced timer is repaired within that bound."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime

from sqlalchemy.orm import Session

from service import workers
from service.leases import (
    BATCH_LIMIT,
    Effects,
    expire_pending,
    next_deadline,
    promote_due,
    reclaim_expired_leases,
)
from service.runtime import Runtime

log = logging.getLogger("celeriac.maintenance")

CLOCK_REFRESH_SECONDS = 60.0


def _sweep(session: Session, now: datetime, effects: Effects, retention: float) -> int:
    return (
        promote_due(session, now, effects)
        # A lost worker's leases end now: the next pass (at once) reclaims them.
        + workers.mark_lost(session, now, retention)
        + reclaim_expired_leases(session, now, effects)
        + expire_pending(session, now, effects)
    )


def _next_due(session: Session) -> datetime | None:
    due = [d for d in (next_deadline(session), workers.next_due(session)) if d is not None]
    return min(due) if due else None


async def run_once(runtime: Runtime) -> int:
    now = runtime.clock.now()
    retention = runtime.settings.worker_lost_retention_seconds
    changed = await runtime.transact(
        lambda session, effects: _sweep(session, now, effects, retention)
    )
    await runtime.broker.reconcile(now)
    return changed


async def maintenance_loop(runtime: Runtime) -> None:
    signals = runtime.signals
    interval = runtime.settings.reconcile_interval_seconds
    clock_measured = 0.0
    while True:
        try:
            if time.monotonic() - clock_measured > CLOCK_REFRESH_SECONDS:
                await runtime.db.read(runtime.clock.measure)
                clock_measured = time.monotonic()
            signals.maintenance.clear()
            changed = await run_once(runtime)
            if changed >= BATCH_LIMIT:
                continue  # more of the same is waiting
            upcoming = await runtime.db.read(_next_due)
        except Exception:
            log.exception("maintenance pass failed; retrying")
            upcoming = None
        signals.earliest_due = upcoming
        sleep = interval
        if upcoming is not None:
            sleep = min(interval, max((upcoming - runtime.clock.now()).total_seconds(), 0.0))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(signals.maintenance.wait(), sleep)
