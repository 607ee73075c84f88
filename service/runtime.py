"""The service's live objects, built once by the app's lifespan, and the few operations
every router shares: run a unit of work, then apply its effects after commit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.brokers.base import Broker
from service.db import Database
from service.dispatch import Dispatcher
from service.effects import Effects
from service.idempotency import Outcome, Submitted, insert_skipping_taken_direct, store_group
from service.isolation import is_row_error, not_storable
from service.jobs import Defaults, dispatch_of_values
from service.longpoll import LongPolls
from service.models import JobValues
from service.observe import Observer
from service.pg_direct import Direct, DirectPg, Refused
from service.pg_pipeline import SubmitPipeline
from service.settings import Settings
from service.signals import Signals
from service.sqlite_direct import DirectSqlite
from service.tracing import Tracing

T = TypeVar("T")
log = logging.getLogger("celeriac.submit")


CLOCK_READINGS = 3


class Clock:
    """The database's clock, so that replicas and workers with skewed clocks agree on
    when a delayed job is due. We measure the offset, not ask SQL for every timestamp."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def measure(self, session: Session) -> None:
        dialect = session.get_bind().dialect.name
        query = {
            # clock_timestamp(), not now(): now() is when the transaction began.
            "postgresql": "SELECT (clock_timestamp() AT TIME ZONE 'UTC')",
            "mysql": "SELECT UTC_TIMESTAMP(6)",
            "mariadb": "SELECT UTC_TIMESTAMP(6)",
        }.get(dialect)
        if query is None:  # SQLite runs in-process: its clock is ours
            return
        # The reading with the shortest round trip bounds the error best: a first one
        # that also waited for a connection or a BEGIN was seen 15 ms off.
        readings = []
        for _ in range(CLOCK_READINGS):
            before = datetime.now(UTC)
            db_now: datetime = session.execute(sa.text(query)).scalar_one()
            after = datetime.now(UTC)
            readings.append(
                (after - before, db_now.replace(tzinfo=UTC) - after + (after - before) / 2)
            )
        self.offset = min(readings)[1]


Waiter = tuple[JobValues, asyncio.Future[Submitted]]
# Committed groups whose publish may be in flight at once: the next group commits while
# the previous one is being published, and a slow broker holds commits back only once
# this many wait (backpressure, not an unbounded pile of tasks).
PUBLISHES_IN_FLIGHT = 4


class SubmitBatcher:
    """Group commit for ``POST /jobs``: requests that arrive while a commit is in flight
    are stored together in the next transaction, so 16 concurrent clients cost a few
    commits, not sixteen. Requests with an Idempotency-Key join the same group
    (service/idempotency.py resolves their replays in it). Each group is published after
    its commit, never before, and beside the next group's commit rather than ahead of it:
    a client submitting in a loop does not wait for the previous submit's publish."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._pending: list[Waiter] = []
        self._flushing = False
        self._publishing = asyncio.Semaphore(PUBLISHES_IN_FLIGHT)
        self._publish_failing = False
        # Groups commit one at a time, each on this thread: a lighter hop than the shared
        # pool's (which also makes a group wait for a token while reads hold them all).
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="celeriac-submit")
        # On PostgreSQL: one round trip per group, from the event loop (pg_pipeline.py).
        self.pipeline = SubmitPipeline.for_engine(runtime.db.engine, runtime.db.outage)

    async def close(self) -> None:
        if self.pipeline is not None:
            await self.pipeline.close()

    async def submit(self, row: JobValues) -> Submitted:
        future: asyncio.Future[Submitted] = asyncio.get_running_loop().create_future()
        self._pending.append((row, future))
        if not self._flushing:
            self._flushing = True
            asyncio.create_task(self._flush())  # noqa: RUF006 - the futures keep it observed
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                # One turn of the loop first: requests whose bodies were parsed while the
                # last commit ran join this group instead of waiting for the next one.
                await asyncio.sleep(0)
                batch, self._pending = self._pending, []
                committed = await self._insert(batch)
                if not committed.rows:
                    continue
                if committed.effects.announced:  # the broker's part rode the commit
                    await self._publish(committed)  # what is left: this process's wake-ups
                    continue
                await self._publishing.acquire()
                self.runtime.spawn(self._publish(committed, slot=True), "celeriac-submit-publish")
        finally:
            self._flushing = False

    async def _publish(self, committed: Committed, slot: bool = False) -> None:
        """A failure is logged once until a publish succeeds again: the jobs are committed,
        and the maintenance pass's reconcile indexes what a lost publish missed."""
        try:
            await self.runtime.after_submit(committed.rows, committed.effects)
        except Exception:
            if not self._publish_failing:
                log.exception("publishing submitted jobs failed; reconcile will index them")
            self._publish_failing = True
        else:
            self._publish_failing = False
        finally:
            if slot:
                self._publishing.release()

    def _store(self, session: Session, rows: list[JobValues]) -> tuple[list[Outcome], Committed]:
        """One group's unit of work: its rows stored, and announced in the same transaction
        where the broker can (on PostgreSQL the SQL broker's NOTIFY rides the commit)."""
        outcomes = store_group(session, rows, self.runtime.settings.idempotency_ttl_seconds)
        inserted = [o.row for o in outcomes if isinstance(o, Submitted) and not o.replayed]
        effects = self.runtime.announce_submitted(session, inserted) if inserted else Effects()
        return outcomes, Committed(inserted, effects)

    async def _insert(self, batch: list[Waiter]) -> Committed:
        """Store the rows of ``batch`` and settle their futures; returns the rows inserted
        (replays are not) and what their commits leave to do."""
        rows = [row for row, _ in batch]
        announced = Effects()  # the broker's part for every row: a wake-up too many is harmless
        try:
            skipped = await self._insert_direct(rows, announced)
        except Refused:  # nothing committed: the pool's path finds the row at fault
            return await self._insert_pooled(batch)
        except Exception as exc:
            for _, future in batch:
                _settle(future, exc)
            return Committed([], Effects())
        if skipped is None:
            return await self._insert_pooled(batch)
        effects = announced  # the common case: every row inserted, nothing to recompute
        if skipped:
            effects = submitted_effects([row for row in rows if row["id"] not in skipped])
            effects.announced = announced.announced
        inserted: list[JobValues] = []
        for row, future in batch:
            if row["id"] not in skipped:
                inserted.append(row)
                _settle(future, Submitted(row))
        committed = Committed(inserted, effects)
        if skipped:  # their keys were taken: a replay, a mismatch, or a key to release
            rest = await self._insert_pooled([w for w in batch if w[0]["id"] in skipped])
            committed = committed.joined(rest)
        return committed

    async def _insert_direct(self, rows: list[JobValues], announced: Effects) -> set[str] | None:
        """The group's one statement from the event loop, skipping rows whose key is
        taken (their ids are returned): on PostgreSQL the pipeline's, its NOTIFY in the
        same commit; on SQLite, on the loop's connection (a group of at most
        ``SHORT_UNIT_ROWS``). None where neither applies. ``announced`` gets what the
        commit leaves to do for every row."""
        notices = self.runtime.broker.commit_notices(submitted_effects(rows, announced))
        if self.pipeline is not None:
            return await self.pipeline.insert(rows, notices)
        direct = self.runtime.loop_direct
        if not notices and isinstance(direct, DirectSqlite) and direct.takes(len(rows)):
            return await insert_skipping_taken_direct(direct, rows)
        return None

    async def _insert_pooled(self, batch: list[Waiter], retried: bool = False) -> Committed:
        """``_insert`` in one ORM session, in the committer's thread (on SQLite a small
        group on the event loop, ``Database.run``)."""
        rows = [row for row, _ in batch]
        work = partial(self._store, rows=rows)
        try:
            outcomes, committed = await self.runtime.db.run(
                work, rows=len(rows), executor=self._committer
            )
        except Exception as exc:
            return await self._refused(batch, exc, retried)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            _settle(future, outcome)
        return committed

    async def _refused(self, batch: list[Waiter], exc: Exception, retried: bool) -> Committed:
        """When the database refuses a row, the halves are tried apart (bisection) until
        the refused row is alone: it gets a 422 and the others commit. An outage is no
        row's fault: every waiter still in ``batch`` gets it."""
        if not is_row_error(exc):
            for _, future in batch:
                _settle(future, exc)
            return Committed([], Effects())
        if isinstance(exc, IntegrityError) and not retried and _keyed(batch):
            # Most likely a concurrent group (another replica) committed one of our keys
            # after our look-up: looking again finds it and replays it.
            return await self._insert_pooled(batch, retried=True)
        if len(batch) == 1:
            _settle(batch[0][1], not_storable(exc))
            return Committed([], Effects())
        middle = len(batch) // 2
        first = await self._insert_pooled(batch[:middle])
        return first.joined(await self._insert_pooled(batch[middle:]))


@dataclass(frozen=True, slots=True)
class Committed:
    """The rows a group's commit (or commits, once bisected) inserted, and what is left to
    do after it (``Runtime.after_submit``)."""

    rows: list[JobValues]
    effects: Effects

    def joined(self, other: Committed) -> Committed:
        """Both commits' rows; their effects announced only if both commits' were."""
        if not (self.rows and other.rows):
            return self if self.rows else other
        self.effects.merge(other.effects)
        return Committed(self.rows + other.rows, self.effects)


def _keyed(batch: list[Waiter]) -> bool:
    return any(row["idempotency_key"] is not None for row, _ in batch)


def _settle(future: asyncio.Future[Submitted], outcome: Submitted | Exception) -> None:
    if future.done():  # its request went away (client disconnect)
        return
    if isinstance(outcome, Submitted):
        future.set_result(outcome)
    else:
        future.set_exception(outcome)


@dataclass
class Runtime:
    settings: Settings
    db: Database
    signals: Signals
    broker: Broker
    clock: Clock = field(default_factory=Clock)
    # Hears of committed work after each commit (service/metrics.py); a no-op by default.
    observer: Observer = field(default_factory=Observer)
    background: list[asyncio.Task[Any]] = field(default_factory=list)
    # False until the database answered at start-up (service/startup.py): routes 503.
    started: bool = False
    # What start-up waits for, when it is not the database answering (a schema to migrate).
    startup_problem: str | None = None

    def __post_init__(self) -> None:
        self.tracing = Tracing(self.settings.tracing)  # no-op unless CELERIAC_TRACING
        self.defaults = Defaults(
            max_retries=self.settings.default_max_retries,
            # Per-queue webhooks and the result TTL (0 = forever).
            webhooks={
                queue: spec.model_dump()
                for queue, spec in self.settings.webhook_queue_defaults.items()
            },
            result_ttl=self.settings.result_expires_seconds or None,
        )
        self.submits = SubmitBatcher(self)
        # On PostgreSQL: the hot paths' single statements, from the event loop (pg_direct.py).
        self.direct = DirectPg.for_engine(self.db.engine, self.db.outage)
        # Those of them that read the same on SQLite (a queue's claim, a job read): there,
        # on a connection of their own (sqlite_direct.py).
        self.loop_direct: Direct | None = self.direct or DirectSqlite.for_engine(self.db.engine)
        self.long_polls = LongPolls(
            self.settings.max_long_polls, self.settings.max_long_polls_per_key
        )
        self._spawned: set[asyncio.Task[Any]] = set()
        self.dispatcher = Dispatcher(
            self.db,
            self.signals,
            self.broker,
            fallback_seconds=self.settings.sql_poll_fallback_seconds,
            spawn=self.spawn,
            direct=self.direct,
            loop_direct=self.loop_direct,
        )

    async def close(self) -> None:
        """Close the connections of the event loop's own (the submit pipeline's, the
        direct path's); the pool's are the engine's."""
        await self.submits.close()
        if self.loop_direct is not None:  # (PostgreSQL's is ``direct`` itself)
            await self.loop_direct.close()

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``work`` beyond the request that started it; cancelled at shutdown."""
        task = asyncio.create_task(work, name=name)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    def spawned(self) -> list[asyncio.Task[Any]]:
        return list(self._spawned)

    async def transact(
        self, work: Callable[[Session, Effects], T], *, rows: int | None = None
    ) -> T:
        """Run ``work`` in one transaction, then its effects: nothing reaches the broker or
        a waiter before the commit that makes it true. ``rows``: as ``Database.run``."""

        def attempt(session: Session) -> tuple[T, Effects]:
            effects = Effects()  # fresh for each try: a retried transaction starts over
            result = work(session, effects)
            self.broker.in_transaction(session, effects)  # a NOTIFY rides the commit
            return result, effects

        result, effects = await self.db.run(attempt, rows=rows)
        await self.apply(effects)
        return result

    async def apply(self, effects: Effects) -> None:
        self.observer.committed(effects)
        # First: the limit slots of ended leases free in Redis (flow control) before the
        # jobs they held back are announced, so a worker woken by those finds room.
        await self.broker.after_commit(effects)
        if effects.dispatch:
            # This process's SQL waiters (the SQL broker, or any broker's fallback)
            # hear of it at once; the broker tells everyone else.
            self.signals.queues_ready({job.queue for job in effects.dispatch})
            if not effects.announced:
                await self.broker.publish(effects.dispatch)
        if effects.reopened:
            self.signals.queues_ready(effects.reopened)
        if effects.finished:
            self.signals.jobs_finished(effects.finished, effects.settled)
        if effects.earliest_due is not None:
            self.signals.due_at(effects.earliest_due)
        if effects.deliveries:  # webhook outbox rows committed
            self.signals.webhooks.set()
        if (effects.finished or effects.earliest_due is not None) and not effects.announced:
            await self.broker.announce(effects.finished, effects.earliest_due)
        if effects.traced:
            self.tracing.record("celeriac settle", effects.traced, effects.traced_since_ns)

    def announce_submitted(self, session: Session, rows: list[JobValues]) -> Effects:
        """Inside the transaction that inserts ``rows``, just before its commit: what that
        commit leaves to do, with the broker's in-transaction part done (on PostgreSQL
        with the SQL broker, the NOTIFY that rides the commit). Runs in the database's
        thread. Hand the result to ``after_submit(rows, effects)`` after the commit."""
        effects = submitted_effects(rows)
        self.broker.in_transaction(session, effects)
        return effects

    async def after_submit(self, rows: list[JobValues], effects: Effects | None = None) -> None:
        """After the commit of ``rows``: publish them, wake waiters. ``effects``: what
        ``announce_submitted`` returned inside that transaction, if it was called."""
        self.observer.submitted(rows)
        await self.apply(submitted_effects(rows) if effects is None else effects)


def submitted_effects(rows: list[JobValues], effects: Effects | None = None) -> Effects:
    """What committing new jobs leaves to do: dispatch the queued, time the delayed."""
    effects = Effects() if effects is None else effects
    for row in rows:
        if row["status"] == "queued":
            effects.dispatch.append(dispatch_of_values(row))
        else:
            effects.due_at(row["run_at"])
    return effects
