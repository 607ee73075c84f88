"""Single statements the event loop runs itself on PostgreSQL (issue 14).

Through the pool, each unit of work pays a hop to a database thread and back, an ORM
session, and SQLAlchemy's execution machinery around every statement: on this project's
2-core machine a primary-key read cost about 1.3 ms of CPU that way, against 0.3 ms for
the same statement sent from the event loop on a psycopg ``AsyncConnection``. The hot
paths whose work is one statement (reading a job, a claim, the settle of a success) run
here; everything else, and every database but PostgreSQL, keeps the pool.

- ``Compiled``: a Core statement compiled once, with the binding SQLAlchemy would apply to
  each parameter (JSON, the UTC timestamps) and the conversion of each returned column,
  so a value written or read here is exactly what the pool's path writes or reads.
- ``DirectPg.fetch``: run one, in autocommit (each statement its own transaction), on one
  of a few connections of its own (``CONNECTIONS``, opened as needed), with PostgreSQL
  NOTIFYs in the same implicit transaction when asked, and statements whose rows nobody
  reads before it (``first``): a pipeline whose one ``Sync`` commits them all, or none.
  An unreachable database raises ``DatabaseUnavailable`` (503), as the pool does; any
  other error raises ``Refused``: nothing was committed, and the caller takes the pool's
  path, which answers as it always has (retries a deadlock, refuses a bad row).
  A connection that failed, or whose statement was cancelled, is closed, never reused.
- ``DirectPg.transaction``: an explicit transaction (READ COMMITTED) on one of those
  connections, for a unit whose later statements depend on the rows of earlier ones
  (flow control's claim, service/flow_direct.py): a pipeline per round trip, the COMMIT
  in the last; the same failures, and a unit left without its commit rolls back.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import select
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import psycopg
import sqlalchemy as sa

from service.db import CONNECT_TIMEOUT_SECONDS
from service.outage import OutageTracker, is_unreachable
from service.pg_wire import Statement, WireConnection

# Connections the event loop's statements may hold at once, per process. Each statement
# takes a fraction of a millisecond, so a few serve hundreds of requests at a time; a
# statement waiting on a row lock (a claim behind a settle) holds one meanwhile.
CONNECTIONS = 8
NOTIFY = b"SELECT pg_notify($1, $2)"
# As the pool's transactions begin: a unit that counts after it locks (flow control's
# claim) needs each statement's own snapshot, whatever the server's default.
BEGIN = b"BEGIN ISOLATION LEVEL READ COMMITTED"
APPLICATION_NAME = "celeriac-direct"

Row = dict[str, Any]
T = TypeVar("T")
P = TypeVar("P")  # a statement's parameters, as its driver takes them
# A statement and its values, run ahead of another in the same transaction.
Step = tuple["Compiled", Mapping[str, Any]]
Processor = Callable[[Any], Any] | None


class Refused(Exception):
    """The statement failed and committed nothing: take the pool's path instead."""


def connect_args(engine: sa.Engine, application_name: str) -> tuple[list[Any], dict[str, Any]]:
    """psycopg's ``connect`` arguments for ``engine``'s database, as its pool connects."""
    args, options = engine.dialect.create_connect_args(engine.url)
    options.setdefault("connect_timeout", CONNECT_TIMEOUT_SECONDS)
    options.setdefault("application_name", application_name)
    return list(args), dict(options)


# The hot statements reach ``jobs`` through its indexes, by design (a primary key, a
# queue's ready jobs, a status). PostgreSQL runs a prepared statement with a generic
# plan, made once for any values and kept until the table's statistics change; one made
# while the table was nearly empty chose a sequential scan, and kept reading the whole
# table once it held a backlog: 30,000 jobs queued in another queue took a round trip
# from 4.7 to 18 ms (docs/benchmarks.md, issue 14, thirteenth pass). Nothing changes the
# statistics without autovacuum, and with it only a minute or more later. Only on these
# connections: none of their statements is meant to scan the table.
HOT_SESSION = "SET enable_seqscan = off"


async def connect_wire(connect: tuple[list[Any], dict[str, Any]]) -> WireConnection:
    """A connection for the hot statements (``connect_args``), in autocommit."""
    args, options = connect
    conn = await psycopg.AsyncConnection.connect(*args, **options, autocommit=True)
    try:
        await conn.execute(HOT_SESSION)
    except BaseException:
        await conn.close()
        raise
    return WireConnection(conn)


def still_open(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether the idle connection is still open, as far as can be told without a round
    trip. A server that closed it (a restart, ``pg_terminate_backend``, an idle timeout)
    left its last message and EOF on the socket, and an idle connection that LISTENs to
    nothing has nothing else to read: readable means gone (at worst a notice, and one
    reconnect). Seen here, the statement goes out on a new connection instead of failing."""
    if conn.closed:
        return False
    poller = select.poll()  # not select.select: a busy service's descriptors pass 1024
    poller.register(conn.fileno(), select.POLLIN)
    return not poller.poll(0)


def bound(bind: Callable[[T], P], values: T) -> P:
    """``bind(values)``; a value the binding refuses (a date past 9999 once moved to UTC)
    raises ``Refused``: nothing was sent, and the pool's path names the row at fault."""
    try:
        return bind(values)
    except (ValueError, TypeError, OverflowError) as exc:
        raise Refused(str(exc)) from exc


def refusal(exc: psycopg.Error, outage: OutageTracker) -> Exception:
    """What a failed statement raises: ``DatabaseUnavailable`` (503) when the database
    cannot be reached, as the pool's path says it; else ``Refused`` (nothing committed)."""
    wrapped = sa.exc.DBAPIError.instance(None, None, exc, psycopg.Error)
    if is_unreachable(wrapped):
        return outage.failed(wrapped)
    return Refused(str(exc))


class Direct(ABC):
    """A direct path: statements compiled once for its database, each run from the event
    loop. ``DirectPg``, or ``DirectSqlite`` (service/sqlite_direct.py) for the statements
    that read the same on SQLite (a queue's claim, a job read)."""

    # The most rows a unit may touch here (None: any); a path on the event loop itself
    # takes short units only, as ``Database.run`` does.
    max_rows: int | None = None

    def __init__(self, dialect: sa.Dialect) -> None:
        self.dialect = dialect
        self._statements: dict[Any, Compiled] = {}

    def takes(self, rows: int) -> bool:
        """Whether a unit of ``rows`` rows may take this path."""
        return self.max_rows is None or rows <= self.max_rows

    def compiled(
        self,
        key: Any,
        build: Callable[[], sa.ClauseElement],
        column_keys: Sequence[str] | None = None,
    ) -> Compiled:
        """The statement ``build`` makes, compiled once per ``key`` for this database
        (an INSERT for the columns ``column_keys`` when given)."""
        found = self._statements.get(key)
        if found is None:
            found = self._statements[key] = Compiled(build(), self.dialect, column_keys)
        return found

    @abstractmethod
    async def fetch(
        self,
        compiled: Compiled,
        values: Mapping[str, Any],
        notices: Sequence[tuple[str, str]] = (),
        first: Sequence[Step] = (),
    ) -> list[Row]:
        """The rows ``compiled`` returned; ``first`` ran before it, and ``notices`` after,
        in its transaction: one commit (one flush of the WAL) for all of them."""

    @abstractmethod
    async def close(self) -> None: ...


class Compiled:
    """A Core statement compiled once for its database (PostgreSQL through psycopg, or
    SQLite: service/sqlite_direct.py): its SQL, the bind processor of each parameter,
    and the result processor of each returned column."""

    def __init__(
        self,
        statement: sa.ClauseElement,
        dialect: sa.Dialect,
        column_keys: Sequence[str] | None = None,
    ) -> None:
        compiled = cast(
            sa.sql.compiler.SQLCompiler,
            statement.compile(
                dialect=dialect, column_keys=None if column_keys is None else list(column_keys)
            ),
        )
        self.sql = compiled.string
        self.sql_bytes = self.sql.encode()  # as libpq takes it (service/pg_wire.py)
        # One processor per parameter here (a tuple only for expanding IN lists, which
        # these statements do not use: ``= ANY(array)`` instead). SQLite's parameters
        # are positional (``?``), in the statement's order, a name once per use.
        binds = cast(Mapping[str, Processor], compiled._bind_processors)
        self.positional = bool(dialect.positional)
        names = list(compiled.positiontup or ()) if self.positional else list(compiled.params)
        self.binders: tuple[tuple[str, Processor], ...] = tuple(
            (name, binds.get(name)) for name in names
        )
        self._fixed = {
            name: bind.effective_value
            for name, bind in compiled.binds.items()
            if not bind.required and bind.callable is None
        }
        self._returned = [(e.keyname, e.type) for e in compiled._result_columns or ()]
        self.returns_rows = bool(self._returned)
        self._dialect = dialect
        # Per returned column: its key and conversion, once the first answer told the
        # columns' types (a numeric column's conversion depends on the server's type).
        self.columns: tuple[tuple[str, Processor], ...] | None = None

    def params(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The statement's parameters: ``values``, and the literals the statement holds
        (``status = 'queued'``, ``attempt + 1``), which SQLAlchemy sends as parameters."""
        fixed = self._fixed
        return {
            name: bind(value) if bind is not None else value
            for name, bind in self.binders
            for value in (values[name] if name in values else fixed[name],)
        }

    def positional_params(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        """``params`` in the statement's order, for a driver with ``?`` placeholders."""
        fixed = self._fixed
        return tuple(
            bind(value) if bind is not None else value
            for name, bind in self.binders
            for value in (values[name] if name in values else fixed[name],)
        )

    def rows(self, fetched: Sequence[Sequence[Any]], types: Sequence[Any]) -> list[Row]:
        """``fetched`` as dicts of converted values; ``types``: each column's type as the
        driver tells it (PostgreSQL's OIDs; None on SQLite), read only by the first call."""
        if self.columns is None:
            self.columns = tuple(
                (key, kind._cached_result_processor(self._dialect, type_code))
                for (key, kind), type_code in zip(self._returned, types, strict=True)
            )
        return [self._row(self.columns, values) for values in fetched]

    @staticmethod
    def _row(columns: tuple[tuple[str, Processor], ...], values: Sequence[Any]) -> Row:
        return {
            key: value if load is None else load(value)
            for (key, load), value in zip(columns, values, strict=True)
        }


class DirectPg(Direct):
    """``fetch(compiled, values, notices)``: run one statement (and send the notices in its
    transaction); the rows it returned. See the module's docstring."""

    def __init__(self, engine: sa.Engine, outage: OutageTracker) -> None:
        super().__init__(wire_dialect(engine.dialect))
        self.outage = outage
        self._connect_args = connect_args(engine, APPLICATION_NAME)
        self._idle: list[WireConnection] = []
        self._slots = asyncio.Semaphore(CONNECTIONS)

    @classmethod
    def for_engine(cls, engine: sa.Engine, outage: OutageTracker) -> DirectPg | None:
        """The direct path where it applies: PostgreSQL through psycopg 3."""
        if engine.dialect.name != "postgresql" or engine.dialect.driver != "psycopg":
            return None
        return cls(engine, outage)

    async def fetch(
        self,
        compiled: Compiled,
        values: Mapping[str, Any],
        notices: Sequence[tuple[str, str]] = (),
        first: Sequence[Step] = (),
    ) -> list[Row]:
        statements: list[Statement] = [
            (step.sql_bytes, bound(step.positional_params, step_values))
            for step, step_values in first
        ]
        statements.append((compiled.sql_bytes, bound(compiled.positional_params, values)))
        statements += [(NOTIFY, notice) for notice in notices]
        started = time.monotonic()
        try:
            async with self._connection() as wire:
                answer = (await wire.run(statements))[len(first)]
        except psycopg.Error as exc:
            raise refusal(exc, self.outage) from exc
        self.outage.succeeded(started)
        if not compiled.returns_rows:
            return []
        # The columns' types only the first time: they settle each column's conversion.
        return compiled.rows(answer.rows, () if compiled.columns else answer.types())

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[DirectTransaction]:
        """An explicit transaction on one of these connections, for a unit whose later
        statements depend on the rows of earlier ones (flow control's claim: a few round
        trips, each a pipeline). Left without ``commit``, it rolls back; left by an
        error or a cancellation, its connection is closed, and the server rolls back."""
        async with self._connection() as wire:
            tx = DirectTransaction(wire, self.outage)
            yield tx
            if tx.begun and not tx.committed:
                await tx.rollback()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[WireConnection]:
        async with self._slots:
            wire = await self._take()
            try:
                yield wire
            except BaseException:  # failed or cancelled mid-statement: its state is unknown
                await asyncio.shield(wire.close())
                raise
            self._idle.append(wire)

    async def _take(self) -> WireConnection:
        while self._idle:
            wire = self._idle.pop()
            if still_open(wire.conn):
                return wire
            await wire.close()
        return await connect_wire(self._connect_args)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for wire in idle:
            await wire.close()


def wire_dialect(dialect: sa.Dialect) -> sa.Dialect:
    """``dialect`` with numbered placeholders (``$1``), as libpq takes them; otherwise the
    same dialect (its server's version, its types' binding and conversion of values)."""
    numbered = copy.copy(dialect)
    numbered.paramstyle = "numeric_dollar"
    numbered.positional = True
    return numbered


class DirectTransaction:
    """One explicit transaction from the event loop (``DirectPg.transaction``): ``run``
    sends steps in one pipeline (the first begins the transaction), ``commit`` its last
    steps and the COMMIT in one. Each returns every step's rows, converted as ``fetch``
    converts them. A failure raises as ``fetch`` does (``Refused``: nothing committed;
    ``DatabaseUnavailable``)."""

    __slots__ = ("_outage", "_started", "_wire", "begun", "committed")

    def __init__(self, wire: WireConnection, outage: OutageTracker) -> None:
        self._wire = wire
        self._outage = outage
        self._started = time.monotonic()
        self.begun = self.committed = False

    async def run(self, steps: Sequence[Step]) -> list[list[Row]]:
        return await self._send(steps, b"")

    async def commit(self, steps: Sequence[Step] = ()) -> list[list[Row]]:
        rows = await self._send(steps, b"COMMIT")
        self.committed = True
        self._outage.succeeded(self._started)
        return rows

    async def rollback(self) -> None:
        await self._send((), b"ROLLBACK")

    async def _send(self, steps: Sequence[Step], end: bytes) -> list[list[Row]]:
        statements: list[Statement] = [] if self.begun else [(BEGIN, ())]
        statements += [(step.sql_bytes, bound(step.positional_params, v)) for step, v in steps]
        if end:
            statements.append((end, ()))
        try:
            answers = await self._wire.run(statements)
        except psycopg.Error as exc:
            raise refusal(exc, self._outage) from exc
        answers = answers[0 if self.begun else 1 :]
        self.begun = True
        return [
            step.rows(answer.rows, () if step.columns else answer.types())
            if step.returns_rows
            else []
            for (step, _), answer in zip(steps, answers, strict=False)
        ]
