"""The embedded default: dispatch straight from the jobs table.

Claims use ``SELECT … FOR UPDATE SKIP LOCKED`` (PostgreSQL, MariaDB) or SQLite's single
writer. Waiting workers wake on in-process signals; on PostgreSQL, LISTEN/NOTIFY carries
them between service replicas. On a database without notifications (MariaDB, or several
processes on one SQLite file) one shared poll per process re-checks SQL every
``sql_poll_fallback_seconds`` for all waiters at once (lease waiters and result waiters):
the only timer-driven read, and only while something waits. Waiters never query on a
timer of their own, so 500 idle long-polls cost one query per interval, not 500."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial

import sqlalchemy as sa

from service import errors
from service.brokers.base import Broker, BrokerHooks
from service.db import Database
from service.jobs import Dispatch
from service.leases import LeaseTerms, claim_from_queues
from service.models import JOBS_TABLE, JobValues
from service.schemas import FINISHED, JobStatus
from service.signals import Signals

log = logging.getLogger("celeriac.broker.sql")

CHANNEL = "celeriac"
_PAYLOAD_LIMIT = 7900  # NOTIFY payloads must stay under 8000 bytes
_IN_CHUNK = 500  # values per IN (...) list in the shared poll


class SqlBroker(Broker):
    name = "sql"

    def __init__(self, db: Database, signals: Signals, *, fallback_seconds: float) -> None:
        super().__init__(db, signals)
        self.fallback_seconds = fallback_seconds
        self._listener: _PgListener | None = None
        self._poll: _SharedPoll | None = None
        self._now: Callable[[], datetime] = lambda: datetime.now(UTC)

    @property
    def cross_process(self) -> bool:
        return self._listener is not None

    async def start(self, hooks: BrokerHooks) -> None:
        self._now = hooks.now
        if self.db.dialect == "postgresql":
            self._listener = _PgListener(self.db.engine.url, self.signals)
            self._listener.start(asyncio.get_running_loop())
        else:
            # As the app's broker it also wakes result waiters (GET /jobs/{id}?wait=)
            # for jobs other processes finished.
            self._poll = _SharedPoll(self, finished=True)

    async def close(self) -> None:
        if self._poll is not None:
            await self._poll.stop()
        if self._listener is not None:
            await asyncio.to_thread(self._listener.stop)

    async def publish(self, jobs: Sequence[Dispatch]) -> None:
        queues = {job.queue for job in jobs}
        self.signals.queues_ready(queues)
        await self._notify([f"r:{queue}" for queue in queues])

    async def announce(self, finished: Sequence[str], due: datetime | None) -> None:
        messages = [f"f:{chunk}" for chunk in _chunks(finished)]
        if due is not None:
            messages.append("d:")
        await self._notify(messages)

    async def _notify(self, messages: list[str]) -> None:
        if self._listener is None or not messages:
            return
        # Best effort after a commit: an outage must not turn a committed change into an
        # error (nor stop group commit); the listeners' reconnect wakes every waiter anyway.
        with contextlib.suppress(errors.DatabaseUnavailable):
            await self.db.run(lambda session: _pg_notify(session, messages))

    async def lease(
        self,
        queues: Sequence[str],
        max_jobs: int,
        wait: float,
        terms: Callable[[], LeaseTerms],
    ) -> list[JobValues]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        if wait > 0 and self._poll is None and not self.cross_process:
            # Never started (the AMQP broker's fallback): its lease waiters still need it.
            self._poll = _SharedPoll(self, finished=False)
        while True:
            event = self.signals.ready_waiter(queues)
            try:
                rows = await self.db.run(
                    lambda session: claim_from_queues(session, queues, max_jobs, terms())
                )
                remaining = deadline - loop.time()
                if rows or remaining <= 0:
                    return rows
                # Woken by a local publish, NOTIFY, or the shared poll: never a timer here.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), remaining)
            finally:
                self.signals.drop_ready_waiter(queues, event)

    async def reconcile(self, now: datetime) -> int:
        return 0  # the table is the index: nothing can be lost

    async def cancel_requested(self, job_ids: Sequence[str]) -> None:
        return None  # HTTP workers learn it from their heartbeat answer

    async def ping(self) -> None:
        await self.db.read(lambda session: session.execute(sa.text("SELECT 1")).scalar())


class _SharedPoll:
    """One re-check of SQL per ``fallback_seconds`` for every waiter of this process, on a
    database whose changes cannot be heard from other processes (SQLite, MariaDB): which
    waited-on queues have a queued job, and which waited-on jobs finished. Only their
    waiters are woken, and they alone query. Idle (no query) while nothing waits."""

    def __init__(self, broker: SqlBroker, *, finished: bool) -> None:
        self.broker = broker
        self.signals = broker.signals
        self.finished = finished
        self._failing = False
        self._task = asyncio.create_task(self._run(), name="celeriac-sql-poll")

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            await self.signals.waiting.wait()
            await asyncio.sleep(self.broker.fallback_seconds)
            queues = self.signals.waited_queues()
            ids = self.signals.waited_jobs() if self.finished else []
            if not queues and not ids:
                self.signals.waiting.clear()  # no await since the check: none can be missed
                continue
            await self._poll_once(queues, ids)

    async def _poll_once(self, queues: list[str], ids: list[str]) -> None:
        work = partial(_ready_and_finished, queues=queues, ids=ids, now=self.broker._now())
        try:
            ready, finished = await self.broker.db.read(work)
        except Exception as exc:  # an outage: waiters still end at their deadline
            if not self._failing:
                log.warning("shared wake-up poll failed (%s); retrying", type(exc).__name__)
                self._failing = True
            return
        self._failing = False
        self.signals.queues_ready(ready)
        self.signals.jobs_finished(finished)


def _ready_and_finished(
    session: sa.orm.Session, queues: list[str], ids: list[str], now: datetime
) -> tuple[list[str], list[str]]:
    """The shared poll's two cheap index reads: queues with a job ready to lease (the
    partial index on queued jobs), and finished jobs among ``ids`` (the primary key)."""
    jobs_c = JOBS_TABLE.c
    ready: list[str] = []
    for chunk in _slices(queues):
        query = (
            sa.select(jobs_c.queue)
            .where(
                jobs_c.queue.in_(chunk),
                jobs_c.status == JobStatus.queued,
                sa.or_(jobs_c.expires_at.is_(None), jobs_c.expires_at > now),
            )
            .distinct()
        )
        ready += session.execute(query).scalars()
    finished: list[str] = []
    for chunk in _slices(ids):
        query = sa.select(jobs_c.id).where(jobs_c.id.in_(chunk), jobs_c.status.in_(FINISHED))
        finished += session.execute(query).scalars()
    return ready, finished


def _slices(values: list[str]) -> list[list[str]]:
    return [values[i : i + _IN_CHUNK] for i in range(0, len(values), _IN_CHUNK)]


def _pg_notify(session: sa.orm.Session, messages: list[str]) -> None:
    session.execute(
        sa.text("SELECT pg_notify(:channel, :payload)"),
        [{"channel": CHANNEL, "payload": m} for m in messages],
    )


def _chunks(ids: Sequence[str]) -> list[str]:
    per_message = _PAYLOAD_LIMIT // 37
    return [",".join(ids[i : i + per_message]) for i in range(0, len(ids), per_message)]


def dispatch_message(signals: Signals, payload: str) -> None:
    """Apply one cross-process message (shared by PostgreSQL and Redis transports)."""
    kind, _, body = payload.partition(":")
    if kind == "r":
        signals.queues_ready(body.split(","))
    elif kind == "f":
        signals.jobs_finished(body.split(","))
    elif kind == "d":
        signals.due_at(None)


class _PgListener:
    """LISTEN on a dedicated autocommit connection in a thread; hands each notification
    to the event loop."""

    def __init__(self, url: sa.URL, signals: Signals) -> None:
        self.conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.signals = signals
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(loop,), name="celeriac-pg-listen", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        import psycopg

        lost = False  # logged once per outage, not once per reconnect attempt
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    if lost:
                        log.warning("LISTEN connection back")
                        lost = False
                    # A reconnect may have missed messages: wake everyone to re-check.
                    loop.call_soon_threadsafe(self.signals.due_at, None)
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            loop.call_soon_threadsafe(dispatch_message, self.signals, note.payload)
            except psycopg.Error as exc:
                if not lost:
                    log.warning("LISTEN connection lost (%s); reconnecting", type(exc).__name__)
                    lost = True
                self._stop.wait(1.0)
