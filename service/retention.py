"""Retention (docs/operations.md, "Retention"): finished jobs are deleted once they have
been finished longer than the period of their status (``CELERIAC_RETENTION``), together
with what hangs off them (webhook deliveries and their attempts, per-attempt logs) and
their stored results; idempotency keys are given up once older than
``CELERIAC_IDEMPOTENCY_TTL_SECONDS``.

The work is a background plugin (``Pruner``, service/loops.py): small batches, each its
own transaction, ``SKIP LOCKED`` so that replicas share it. A job whose webhook delivery is
still pending, or whose workflow is still running, waits. A batch is found by keyset on
the ``(status, id)`` index: ids are UUIDv7, so a job created after the cutoff cannot have
finished before it, and ``id < floor(cutoff)`` bounds the scan without an index on
``finished_at``.

``delete_jobs`` is also what ``POST /jobs/bulk`` with ``delete`` uses."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import anyio
import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.ids import floor_of
from service.loops import Pass, Plugin
from service.models import ATTEMPTS_TABLE, DELIVERIES_TABLE, JOBS_TABLE, Base
from service.results import store_of
from service.states import FINISHED, JobStatus

if TYPE_CHECKING:
    from service.runtime import Runtime

log = logging.getLogger("celeriac.retention")
jobs_c = JOBS_TABLE.c

# What CELERIAC_RETENTION starts from; each status it names replaces its entry here.
DEFAULT_RETENTION = "succeeded=7d,failed=30d,cancelled=7d,expired=7d"
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_FOREVER = ("forever", "never", "0")

# Rows that belong to one job (no foreign key; table, column): deleted with it. Looked up
# by name, so a table another part adds is one entry here.
JOB_DEPENDENTS = (
    ("job_logs", "job_id"),
    ("workflow_jobs", "job_id"),
    ("workflow_edges", "parent_id"),
    ("workflow_edges", "child_id"),
)


def parse_retention(text: str) -> dict[JobStatus, timedelta | None]:
    """``succeeded=7d,failed=30d,…`` on top of the defaults; a period of ``0``/``forever``
    keeps that status for ever, ``off`` keeps every job. ValueError names what is wrong."""
    periods: dict[JobStatus, timedelta | None] = {}
    spec = text.strip()
    if spec.lower() == "off":
        return dict.fromkeys(sorted(FINISHED), None)
    entries = [e for e in f"{DEFAULT_RETENTION},{spec}".split(",") if e.strip()]
    for entry in entries:
        name, equals, value = (part.strip().lower() for part in entry.partition("="))
        if not equals or name not in FINISHED:
            raise ValueError(
                f"CELERIAC_RETENTION: {entry.strip()!r} is not <status>=<period> with a final "
                f"status ({', '.join(sorted(FINISHED))}), e.g. succeeded=7d,failed=30d; "
                "or 'off'"
            )
        periods[JobStatus(name)] = _period(name, value)
    return periods


def _period(name: str, value: str) -> timedelta | None:
    if value in _FOREVER:
        return None
    found = _DURATION.match(value)
    if found is None:
        raise ValueError(
            f"CELERIAC_RETENTION: {name}={value!r}: give a number with s, m, h, d or w "
            "(e.g. 7d, 12h, 90s), or 'forever'"
        )
    return timedelta(seconds=float(found.group(1)) * _UNITS[found.group(2)])


# --- deleting jobs ------------------------------------------------------------------------------


def delete_jobs(session: Session, ids: Sequence[str]) -> list[str]:
    """Delete these jobs and every row that hangs off them; returns the result-store keys
    to delete once this commits (a file outliving its row is harmless, the reverse not)."""
    if not ids:
        return []
    chosen = jobs_c.id.in_(ids)
    stored = list(
        session.scalars(sa.select(jobs_c.result_ref).where(chosen, jobs_c.result_ref.is_not(None)))
    )
    deliveries = sa.select(DELIVERIES_TABLE.c.id).where(DELIVERIES_TABLE.c.job_id.in_(ids))
    session.execute(sa.delete(ATTEMPTS_TABLE).where(ATTEMPTS_TABLE.c.delivery_id.in_(deliveries)))
    session.execute(sa.delete(DELIVERIES_TABLE).where(DELIVERIES_TABLE.c.job_id.in_(ids)))
    for name, column in JOB_DEPENDENTS:
        table = Base.metadata.tables.get(name)
        if table is not None and column in table.c:
            session.execute(sa.delete(table).where(table.c[column].in_(ids)))
    session.execute(sa.delete(JOBS_TABLE).where(chosen))
    return [key for key in stored if key]


def prune_batch(
    session: Session, status: JobStatus, cutoff: datetime, limit: int
) -> tuple[int, list[str]]:
    """Delete up to ``limit`` jobs of ``status`` finished before ``cutoff`` (none with a
    webhook delivery still pending); how many, and the result-store keys to delete."""
    pending = (
        sa.select(DELIVERIES_TABLE.c.id)
        .where(DELIVERIES_TABLE.c.job_id == jobs_c.id, DELIVERIES_TABLE.c.status == "pending")
        .exists()
    )
    ids = list(
        session.scalars(
            sa.select(jobs_c.id)
            .where(
                jobs_c.status == status,
                jobs_c.id < floor_of(cutoff),
                jobs_c.finished_at < cutoff,
                ~pending,
                *_not_in_running_workflow(),
            )
            .order_by(jobs_c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
    return len(ids), delete_jobs(session, ids)


def _not_in_running_workflow() -> list[sa.ColumnElement[bool]]:
    """A job of a workflow still running stays: its children may need its result."""
    flows = Base.metadata.tables.get("workflows")
    if flows is None or "workflow_id" not in jobs_c:
        return []
    running = sa.select(flows.c.id).where(
        flows.c.id == jobs_c.workflow_id, flows.c.status == "running"
    )
    return [~running.exists()]


def release_keys(
    session: Session, after: str, cutoff: datetime, limit: int
) -> tuple[int, str | None]:
    """Give up the idempotency keys of up to ``limit`` jobs created before ``cutoff``,
    walking the primary key from ``after``; how many, and where the next batch starts
    (None: none are left before the cutoff)."""
    rows = list(
        session.scalars(
            sa.select(jobs_c.id)
            .where(
                jobs_c.id > after,
                jobs_c.id < floor_of(cutoff),
                jobs_c.idempotency_key.is_not(None),
                jobs_c.created_at < cutoff,
            )
            .order_by(jobs_c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
    if rows:
        session.execute(
            sa.update(JOBS_TABLE)
            .where(jobs_c.id.in_(rows))
            .values(idempotency_key=None, request_hash=None)
        )
    return len(rows), (rows[-1] if len(rows) >= limit else None)


# --- the plugin -------------------------------------------------------------------------------


@dataclass(slots=True)
class Swept:
    pruned: int = 0
    keys: int = 0
    full: bool = False  # some batch was full: more is waiting


class Pruner(Plugin):
    """Deletes finished jobs past their retention, then expired idempotency keys; one
    batch of each per pass (``more`` while a batch comes back full)."""

    name = "retention"

    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        self.periods: Mapping[JobStatus, timedelta | None] = settings.retention_periods
        self.interval = settings.retention_interval_seconds
        self.batch = settings.retention_batch
        self.key_ttl = settings.idempotency_ttl_seconds
        self.store = store_of(settings)
        # Keys are released walking the id order; where the last walk got to (it starts
        # over after a restart, which costs one walk over the older ids).
        self.keys_after = ""

    async def run_once(self, runtime: Runtime) -> Pass:
        swept = Swept()
        now = runtime.clock.now()
        for status, period in self.periods.items():
            if period is not None:
                await self._prune(runtime, swept, status, now - period)
        if self.key_ttl > 0:
            await self._release(runtime, swept, now - timedelta(seconds=self.key_ttl))
        if swept.pruned or swept.keys:
            log.debug("pruned %d job(s), released %d idempotency key(s)", swept.pruned, swept.keys)
        return Pass(more=swept.full)

    async def _prune(
        self, runtime: Runtime, swept: Swept, status: JobStatus, cutoff: datetime
    ) -> None:
        count, stored = await runtime.db.run(
            lambda session: prune_batch(session, status, cutoff, self.batch)
        )
        swept.pruned += count
        swept.full |= count >= self.batch
        if stored and self.store is not None:
            try:
                await anyio.to_thread.run_sync(self.store.delete, stored)
            except OSError:
                log.exception("could not delete %d result file(s) of pruned jobs", len(stored))

    async def _release(self, runtime: Runtime, swept: Swept, cutoff: datetime) -> None:
        after = self.keys_after
        count, last = await runtime.db.run(
            lambda session: release_keys(session, after, cutoff, self.batch)
        )
        swept.keys += count
        if last is None:
            # Everything before the cutoff is done: the next walk starts there.
            self.keys_after = max(after, floor_of(cutoff))
        else:
            self.keys_after = last
            swept.full = True
