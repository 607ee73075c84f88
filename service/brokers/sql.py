"""The embedded default: dispatch straight from the jobs table.

Claims use ``SELECT … FOR UPDATE SKIP LOCKED`` (PostgreSQL, MariaDB) or SQLite's single
writer. Waiting workers wake on in-process signals; on PostgreSQL, LISTEN/NOTIFY carries
them between service replicas. On a database without notifications (MariaDB, or several
processes on one SQLite file) a waiting lease also re-checks every
``sql_poll_fallback_seconds``, the only timer-driven read, and only while a worker waits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from datetime import datetime

import sqlalchemy as sa

from service.brokers.base import Broker, BrokerHooks
from service.db import Database
from service.jobs import Dispatch
from service.leases import LeaseTerms, claim_from_queues
from service.models import JobValues
from service.signals import Signals

log = logging.getLogger("celeriac.broker.sql")

CHANNEL = "celeriac"
_PAYLOAD_LIMIT = 7900  # NOTIFY payloads must stay under 8000 bytes


class SqlBroker(Broker):
    name = "sql"

    def __init__(self, db: Database, signals: Signals, *, fallback_seconds: float) -> None:
        super().__init__(db, signals)
        self.fallback_seconds = fallback_seconds
        self._listener: _PgListener | None = None

    @property
    def cross_process(self) -> bool:
        return self._listener is not None

    async def start(self, hooks: BrokerHooks) -> None:
        if self.db.dialect == "postgresql":
            self._listener = _PgListener(self.db.engine.url, self.signals)
            self._listener.start(asyncio.get_running_loop())

    async def close(self) -> None:
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
        while True:
            event = self.signals.ready_waiter(queues)
            try:
                rows = await self.db.run(
                    lambda session: claim_from_queues(session, queues, max_jobs, terms())
                )
                remaining = deadline - loop.time()
                if rows or remaining <= 0:
                    return rows
                if not self.cross_process:
                    remaining = min(remaining, self.fallback_seconds)
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

        while not self._stop.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    # A reconnect may have missed messages: wake everyone to re-check.
                    loop.call_soon_threadsafe(self.signals.due_at, None)
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            loop.call_soon_threadsafe(dispatch_message, self.signals, note.payload)
            except psycopg.Error as exc:
                log.warning("LISTEN connection lost (%s); reconnecting", type(exc).__name__)
                self._stop.wait(1.0)
