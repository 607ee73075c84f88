"""Engine and session factory. SQLite is tuned for one writer and many readers (WAL,
``BEGIN IMMEDIATE`` so a transaction that will write takes the lock up front instead of
failing to upgrade it later)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar, cast

import anyio
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from service.outage import OutageTracker, is_unreachable

# A server that does not answer (a host gone, a dropped route) must not hold a request,
# or a thread, for the TCP timeout of minutes: refuse after this many seconds instead.
CONNECT_TIMEOUT_SECONDS = 5
# How long a SQLite connection in a worker thread waits for another's write lock.
SQLITE_BUSY_TIMEOUT_MS = 30_000
# The most rows a unit of work may touch to run on the event loop (``Database.run``,
# ``rows``): a claim, a settle or a submit of a few jobs takes well under a millisecond
# there; a batch of hundreds would hold every other request up while it ran.
SHORT_UNIT_ROWS = 64
# Commits on the event loop's SQLite connections between two checkpoints of the log
# (``WalCheckpointer``): a no-op job's round trip writes about 3 commits of a few pages
# each, so this keeps the log near SQLite's own threshold of 1,000 pages.
CHECKPOINT_EVERY_COMMITS = 200
# How long a checkpoint waits for the write lock, or for readers of the old log, before
# it gives up until the next one.
CHECKPOINT_BUSY_SECONDS = 1.0

log = logging.getLogger("celeriac.db")


def create_engine(url: str, *, pool_size: int = 20) -> sa.Engine:
    if url.startswith("sqlite"):
        return _create_sqlite_engine(url)
    options: dict[str, Any] = {}
    if "connect_timeout" not in sa.engine.make_url(url).query:
        options["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
    if url.startswith(("mysql", "mariadb")):
        # InnoDB's default REPEATABLE READ takes gap locks on every index an UPDATE touches,
        # and concurrent claims and reclaims then deadlock; queue tables want READ
        # COMMITTED (PostgreSQL's default), where SKIP LOCKED does what it says.
        options["isolation_level"] = "READ COMMITTED"
    return sa.create_engine(
        url,
        **options,
        pool_size=pool_size,
        max_overflow=pool_size,
        # No pre-ping: it costs a round trip per transaction. A dropped connection fails
        # one unit of work, which SQLAlchemy turns into a pool reset.
        pool_recycle=1800,
    )


class WalCheckpointer:
    """SQLite's checkpoints of the event loop's connections, in a thread of their own.

    By default the connection whose commit takes the write-ahead log past 1,000 pages
    copies the log back into the database file there and then, with an fsync of both:
    on a connection the event loop drives (``Database._on_loop``,
    service/sqlite_direct.py) that held every request up for milliseconds every few
    hundred jobs (the SQLite round trip's p99 in ``make bench``: 21 ms, against 11 ms
    without). Those connections turn SQLite's own checkpoints off
    (``wal_autocheckpoint=0``) and count their commits here; every
    ``CHECKPOINT_EVERY_COMMITS`` this thread copies the log back (``_checkpoint``) while
    the loop goes on serving. Connections in
    threads keep SQLite's default: their checkpoint holds up only their own unit of
    work. A log never checkpointed at all would grow without end, and every read
    searches it: the round trip's median rose by a third in the same test."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._commits = 0
        self._running = False
        self._lock = threading.Lock()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="celeriac-sqlite-checkpoint")
        self._connection: sqlite3.Connection | None = None
        self.checkpoints = 0  # run so far (tests read it)

    def committed(self) -> None:
        """One commit on a connection with checkpoints off; from any thread."""
        self._commits += 1  # not atomic across threads: a count off by one is harmless
        if self._commits < CHECKPOINT_EVERY_COMMITS or self._running:
            return
        with self._lock:
            if self._running:
                return
            self._running, self._commits = True, 0
        try:
            self._thread.submit(self._checkpoint)
        except RuntimeError:  # shut down: the last connection to close checkpoints
            self._running = False

    def _checkpoint(self) -> None:
        try:
            if self._connection is None:
                self._connection = sqlite3.connect(
                    self.path, timeout=CHECKPOINT_BUSY_SECONDS, check_same_thread=False
                )
            # PASSIVE copies the log as it was when it began, holding no lock; the loop
            # goes on committing meanwhile, so under steady writes the log never ends up
            # fully copied, and SQLite starts it over only then: it would grow without
            # end. RESTART then copies the little left under the write lock (the loop's
            # writes meanwhile take the pool's path) and has the next writer start the
            # log from its beginning.
            self._connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self._connection.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
            self.checkpoints += 1
        except sqlite3.Error as exc:  # the next one tries again; the log only grows meanwhile
            log.warning("SQLite checkpoint failed: %s", exc)
        finally:
            self._running = False

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        if self._connection is not None:
            self._connection.close()
            self._connection = None


_checkpointers: weakref.WeakKeyDictionary[sa.Engine, WalCheckpointer] = weakref.WeakKeyDictionary()


def loop_sqlite_engine(engine: sa.Engine) -> tuple[sa.Engine, WalCheckpointer] | None:
    """An engine of one connection to ``engine``'s SQLite file for the event loop to
    drive: it never waits for the write lock (busy_timeout 0) and leaves checkpoints to
    the file's ``WalCheckpointer``, shared by every such engine of ``engine``. None for
    anything but SQLite on a file (each connection to an in-memory database would have
    a database of its own)."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or database in (None, "", ":memory:"):
        return None
    checkpoints = _checkpointers.get(engine)
    if checkpoints is None:
        checkpoints = _checkpointers[engine] = WalCheckpointer(str(database))
    loop_engine = _create_sqlite_engine(
        engine.url, busy_timeout_ms=0, pool_size=1, checkpoints=checkpoints
    )
    return loop_engine, checkpoints


def _create_sqlite_engine(
    url: str | sa.URL,
    *,
    busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS,
    pool_size: int = 8,
    checkpoints: WalCheckpointer | None = None,
) -> sa.Engine:
    engine = sa.create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000},
        pool_size=pool_size,
        max_overflow=pool_size,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        if checkpoints is not None:
            cursor.execute("PRAGMA wal_autocheckpoint=0")  # WalCheckpointer's, in a thread
        cursor.close()

    if checkpoints is not None:
        event.listen(engine, "commit", lambda _connection: checkpoints.committed())

    @event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        readonly = connection.get_execution_options().get("celeriac_readonly", False)
        statement = "BEGIN" if readonly else "BEGIN IMMEDIATE"
        # Straight to the driver: SQLAlchemy's execute path would cost more than the
        # BEGIN itself, and this runs once per unit of work. Its errors ("database is
        # locked") still reach the caller as SQLAlchemy's, which Database.run retries.
        try:
            cast(sqlite3.Connection, connection.connection.driver_connection).execute(statement)
        except sqlite3.Error as exc:
            raise sa.exc.DBAPIError.instance(statement, None, exc, sqlite3.Error) from exc

    return engine


def create_session_factory(engine: sa.Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False, autoflush=False)


T = TypeVar("T")
TRANSIENT_RETRIES = 4
_TRANSIENT_SQLSTATES = {"40001", "40P01"}  # serialization failure, deadlock detected
_TRANSIENT_MYSQL_CODES = {1205, 1213}  # lock wait timeout, deadlock found


def is_transient(exc: sa.exc.DBAPIError) -> bool:
    """Whether the database rolled the transaction back on its own and a retry is safe."""
    original = exc.orig
    if getattr(original, "sqlstate", None) in _TRANSIENT_SQLSTATES:
        return True
    args = getattr(original, "args", ())
    if args and args[0] in _TRANSIENT_MYSQL_CODES:
        return True
    return "database is locked" in str(original)


class Database:
    """Runs one unit of work per call: a session, a transaction that commits when the
    function returns and rolls back when it raises. In a worker thread, except a short
    unit on SQLite (``run``, ``rows``), which runs on the event loop when it can."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.sessions = create_session_factory(engine)
        self.dialect = engine.dialect.name
        self.outage = OutageTracker("database")
        # A read on PostgreSQL runs outside a transaction: one round trip, not three
        # (BEGIN, the query, ROLLBACK). Under READ COMMITTED each statement of a read
        # took its own snapshot already, so no reader sees anything different. SQLite
        # keeps its read transaction (one snapshot per read, no write lock).
        self._read_options: dict[str, Any] = (
            {"isolation_level": "AUTOCOMMIT"}
            if self.dialect == "postgresql"
            else {"celeriac_readonly": True}
        )
        # Short units on SQLite run on the event loop, on a connection of their own.
        loop = loop_sqlite_engine(engine)
        self._loop_engine: sa.Engine | None = None if loop is None else loop[0]
        self.checkpoints: WalCheckpointer | None = None if loop is None else loop[1]
        self._loop_sessions = (
            None if self._loop_engine is None else create_session_factory(self._loop_engine)
        )

    def dispose(self) -> None:
        self.engine.dispose()
        if self._loop_engine is not None:
            self._loop_engine.dispose()
        if self.checkpoints is not None:
            self.checkpoints.close()

    @contextlib.contextmanager
    def _watched(self) -> Iterator[None]:
        """Turn a connection failure into ``DatabaseUnavailable`` (a 503 with Retry-After)
        and tell the tracker, which logs an outage once, when it starts and when it ends."""
        started = time.monotonic()
        try:
            yield
        except (sa.exc.DBAPIError, sa.exc.TimeoutError) as exc:
            if not is_unreachable(exc):
                raise
            raise self.outage.failed(exc) from exc
        self.outage.succeeded(started)

    def run_sync(self, work: Callable[[Session], T]) -> T:
        """One transaction; retried from scratch when the database aborted it to break a
        deadlock or a lock wait (InnoDB and PostgreSQL may pick any transaction as the
        victim, including one whose statements were all correct)."""
        for attempt in range(TRANSIENT_RETRIES):
            try:
                # A connection lost mid-transaction is not retried: its COMMIT may have
                # landed, and only the client's Idempotency-Key can tell.
                with self._watched(), self.sessions.begin() as session:
                    return work(session)
            except sa.exc.DBAPIError as exc:
                if attempt == TRANSIENT_RETRIES - 1 or not is_transient(exc):
                    raise
                time.sleep(random.uniform(0.005, 0.02) * 2**attempt)
        raise AssertionError("unreachable")

    async def run(
        self,
        work: Callable[[Session], T],
        *,
        rows: int | None = None,
        executor: Executor | None = None,
    ) -> T:
        """``work`` in one transaction, in a thread (``executor``'s, else the shared pool's).
        ``rows``: the most rows ``work`` touches, when the caller knows; at most
        ``SHORT_UNIT_ROWS`` on SQLite, it runs on the event loop unless another connection
        holds the write lock (``_on_loop``)."""
        if self._runs_on_loop(rows):
            with contextlib.suppress(_LockHeldElsewhere):
                return self._on_loop(work, write=True)
        if executor is not None:
            return await asyncio.get_running_loop().run_in_executor(executor, self.run_sync, work)
        return await anyio.to_thread.run_sync(self.run_sync, work)

    async def read(self, work: Callable[[Session], T], *, rows: int | None = None) -> T:
        """Read-only work: on SQLite this must not take the write lock. ``rows`` as for
        ``run``."""
        if self._runs_on_loop(rows):
            with contextlib.suppress(_LockHeldElsewhere):
                return self._on_loop(work, write=False)
        return await anyio.to_thread.run_sync(self._read_sync, work)

    def _read_sync(self, work: Callable[[Session], T]) -> T:
        with self._watched(), self.sessions() as session:
            session.connection(execution_options=self._read_options)
            return work(session)

    def _runs_on_loop(self, rows: int | None) -> bool:
        return self._loop_sessions is not None and rows is not None and rows <= SHORT_UNIT_ROWS

    def _on_loop(self, work: Callable[[Session], T], *, write: bool) -> T:
        """SQLite's statements are calls into a library on a local file, microseconds each,
        and under the GIL a thread runs no Python beside the event loop anyway: for a short
        unit of work the hop to a thread and back (0.3 to 1 ms here, more under load) cost
        more than the work. So it runs here, on connections of its own that never wait for
        the write lock (busy_timeout 0): the lock is taken (``BEGIN IMMEDIATE``) before
        ``work`` runs at all, and if a thread here or another process holds it, nothing
        has happened and the unit goes to a thread, where waiting blocks no one."""
        assert self._loop_sessions is not None
        try:
            with self._watched(), self._loop_sessions() as session:
                options = {} if write else self._read_options
                session.connection(execution_options=options)  # BEGIN [IMMEDIATE] now
                result = work(session)
                if write:
                    session.commit()
                return result
        except sa.exc.OperationalError as exc:
            if is_transient(exc):  # "database is locked": held by another connection
                raise _LockHeldElsewhere from exc
            raise


class _LockHeldElsewhere(Exception):
    """A unit of work meant for the event loop found SQLite's write lock taken."""
