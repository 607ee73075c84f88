"""The embedded default: dispatch straight from the jobs table (``service.dispatch``
claims with ``SELECT … FOR UPDATE SKIP LOCKED``, or SQLite's single writer).

Waiting workers wake on in-process signals; on PostgreSQL, LISTEN/NOTIFY carries
them between service replicas. On a database without notifications (MariaDB, or several
processes on one SQLite file) one shared poll per process re-checks SQL every
``sql_poll_fallback_seconds`` for all waiters at once (lease waiters and result waiters):
the only timer-driven read, and only while something waits. Waiters never query on a
timer of their own, so 500 idle long-polls cost one query per interval, not 500."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any

import sqlalchemy as sa

from service import errors
from service.brokers.base import Announcements, Broker, BrokerHooks, chunks
from service.db import Database
from service.effects import Dispatch, Effects
from service.models import JOBS_TABLE
from service.signals import Signals
from service.states import FINISHED, JobStatus

log = logging.getLogger("celeriac.broker.sql")

CHANNEL = "celeriac"
_SENDER_MARK = "~"  # in no queue name or job id
_IN_CHUNK = 500  # values per IN (...) list in the shared poll


class SqlBroker(Broker):
    """The SQL candidate source: ``service.dispatch`` claims straight from the jobs
    table; this class only carries the wake-ups (and wakes result waiters too)."""

    name = "sql"
    holds_index = False

    def __init__(self, db: Database, signals: Signals, *, fallback_seconds: float) -> None:
        super().__init__(db, signals)
        self.fallback_seconds = fallback_seconds
        self._listener: _PgListener | None = None
        self._poll: _SharedPoll | None = None
        self._now: Callable[[], datetime] = lambda: datetime.now(UTC)
        # Names this process in its NOTIFY payloads (``_signed``).
        self._sender = _SENDER_MARK + secrets.token_hex(6)

    async def start(self, hooks: BrokerHooks) -> None:
        self._now = hooks.now
        if self.db.dialect == "postgresql":
            self._listener = _PgListener(self.db.engine.url, self.signals, self._sender)
            self._listener.start(asyncio.get_running_loop())
        else:
            # As the app's broker it also wakes result waiters (GET /jobs/{id}?wait=)
            # for jobs other processes finished.
            self._poll = _SharedPoll(self, finished=True)
            self._poll.task = asyncio.create_task(self._poll.run(), name="celeriac-sql-poll")

    def ensure_wakeups(self, spawn: Callable[[Coroutine[Any, Any, None], str], None]) -> None:
        """Lease waiters wait on ``Signals``; without a listener (this is another broker's
        fallback, or changes cannot be heard) the shared poll must run for them."""
        if self._listener is None and self._poll is None:
            self._poll = _SharedPoll(self, finished=False)
            spawn(self._poll.run(), "celeriac-sql-poll")

    def hears_every_commit(self) -> bool:
        """Whether a job made ready by any process's commit wakes this process's waiters
        within moments (a connected PostgreSQL listener), so that a claim may trust
        ``Signals.ready_generation``; never while the listener is (re)connecting."""
        return self._listener is not None and self._listener.connected

    async def close(self) -> None:
        if self._poll is not None:
            await self._poll.stop()
        if self._listener is not None:
            await asyncio.to_thread(self._listener.stop)

    def in_transaction(self, session: sa.orm.Session, effects: Effects) -> None:
        """On PostgreSQL the NOTIFY rides the transaction that makes it true: delivered
        at its commit, dropped with its rollback, and no transaction of its own."""
        notices = self.commit_notices(effects)
        if notices:
            session.execute(
                sa.text("SELECT pg_notify(:channel, :payload)"),
                [{"channel": channel, "payload": payload} for channel, payload in notices],
            )

    def commit_notices(self, effects: Effects) -> list[tuple[str, str]]:
        if self._listener is None:
            return []
        ready = Announcements.ready(job.queue for job in effects.dispatch)
        messages = ready + Announcements.encode(effects.finished, effects.earliest_due)
        effects.announced = True
        return [(CHANNEL, _signed(message, self._sender)) for message in messages]

    async def publish(self, jobs: Sequence[Dispatch]) -> None:
        # This process's waiters were woken by the runtime; NOTIFY wakes the others'
        # (for a commit that did not carry it itself: ``in_transaction``).
        await self._notify(Announcements.ready(job.queue for job in jobs))

    async def announce(self, finished: Sequence[str], due: datetime | None) -> None:
        await self._notify(Announcements.encode(finished, due))

    async def _notify(self, messages: list[str]) -> None:
        if self._listener is None or not messages:
            return
        # Best effort after a commit: an outage must not turn a committed change into an
        # error (nor stop group commit); the listeners' reconnect wakes every waiter anyway.
        with contextlib.suppress(errors.DatabaseUnavailable):
            await self.db.run(lambda session: _pg_notify(session, messages, self._sender))

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
        self.task: asyncio.Task[None] | None = None  # when its owner runs it itself

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def run(self) -> None:
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
    for chunk in chunks(queues, _IN_CHUNK):
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
    for chunk in chunks(ids, _IN_CHUNK):
        query = sa.select(jobs_c.id).where(jobs_c.id.in_(chunk), jobs_c.status.in_(FINISHED))
        finished += session.execute(query).scalars()
    return ready, finished


def _pg_notify(session: sa.orm.Session, messages: list[str], sender: str) -> None:
    session.execute(
        sa.text("SELECT pg_notify(:channel, :payload)"),
        [{"channel": CHANNEL, "payload": _signed(m, sender)} for m in messages],
    )


def _signed(message: str, sender: str) -> str:
    """``message`` naming its sender, so that the sender's own listener can skip it (its
    runtime woke its waiters at commit already): a last list item, which a replica that
    does not know of it reads as one more queue or job id, waited on by nobody."""
    return f"{message}{sender}" if message.endswith(":") else f"{message},{sender}"


def _unsigned(payload: str) -> tuple[str, str]:
    """(message, sender); sender "" for a message that names none."""
    head, comma, last = payload.rpartition(",")
    if comma and last.startswith(_SENDER_MARK):
        return head, last
    kind, colon, body = payload.partition(":")
    if colon and body.startswith(_SENDER_MARK):
        return f"{kind}:", body
    return payload, ""


class _PgListener:
    """LISTEN on a dedicated autocommit connection in a thread; hands each notification
    to the event loop."""

    def __init__(self, url: sa.URL, signals: Signals, sender: str) -> None:
        self.conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.signals = signals
        self.sender = sender  # this process's own messages are skipped
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # True while LISTEN holds (set from the listener's thread, read on the loop).
        self.connected = False

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
                    self.connected = True
                    # A reconnect may have missed messages: wake everyone to re-check.
                    loop.call_soon_threadsafe(self.signals.wake_everyone)
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            message, sender = _unsigned(note.payload)
                            if sender != self.sender:
                                loop.call_soon_threadsafe(
                                    Announcements.apply, self.signals, message
                                )
            except psycopg.Error as exc:
                self.connected = False
                if not lost:
                    log.warning("LISTEN connection lost (%s); reconnecting", type(exc).__name__)
                    lost = True
                self._stop.wait(1.0)
            finally:
                self.connected = False
