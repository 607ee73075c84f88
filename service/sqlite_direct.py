"""Single statements the event loop runs itself on SQLite (issue 14), as
service/pg_direct.py does on PostgreSQL, for the statements that read the same on both:
a queue's claim (``leases.claim_queue_direct``) and reading a job.

On SQLite a short unit of work already runs on the event loop (``Database._on_loop``),
but through an ORM session and SQLAlchemy's execution machinery, which cost more than the
statement: on this project's 2-core machine an empty claim took 237 µs of CPU that way
and 70 µs here. ``DirectSqlite.fetch`` runs one statement compiled once
(``pg_direct.Compiled``, its parameters positional) on a connection of its own, in
autocommit: the statement is its own transaction. That connection never waits for the
write lock (busy_timeout 0): when another connection holds it, nothing has happened, and
like any other error it raises ``Refused``: the caller takes the pool's path, which
waits for the lock in a thread, retries, and answers as it always has."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import sqlalchemy as sa

from service.db import SHORT_UNIT_ROWS, WalCheckpointer, loop_sqlite_engine
from service.pg_direct import Compiled, Direct, Refused, Row, Step, bound

T = TypeVar("T")


class DirectSqlite(Direct):
    """``fetch(compiled, values)``: run one statement; the rows it returned."""

    max_rows = SHORT_UNIT_ROWS  # it runs on the event loop

    def __init__(self, engine: sa.Engine, checkpoints: WalCheckpointer) -> None:
        super().__init__(engine.dialect)
        # Its own engine of one connection, with the pool's pragmas (WAL, synchronous),
        # checked out once: every statement here runs on the event loop, one at a time.
        # Its commits are counted for the file's checkpoints, which run in a thread.
        self._engine = engine
        self._checkpoints = checkpoints
        self._connection: Any = None  # the pool's wrapper, holding the checkout

    @classmethod
    def for_engine(cls, engine: sa.Engine) -> DirectSqlite | None:
        """The direct path where it applies: SQLite on a file (each connection to an
        in-memory database would have a database of its own)."""
        loop = loop_sqlite_engine(engine)
        return None if loop is None else cls(*loop)

    async def fetch(
        self,
        compiled: Compiled,
        values: Mapping[str, Any],
        notices: Sequence[tuple[str, str]] = (),
        first: Sequence[Step] = (),
    ) -> list[Row]:
        """As ``DirectPg.fetch``, for one statement: SQLite has no notices (several
        statements in one transaction: ``transact``)."""
        if notices or first:
            raise Refused("one statement at a time on SQLite's direct path")
        driver = self._driver()
        changes = driver.total_changes
        try:  # autocommit: a failed statement changed nothing
            rows = _run(driver, compiled, values)
        except sqlite3.Error as exc:
            raise Refused(str(exc)) from exc
        if driver.total_changes != changes:  # it wrote: a commit
            self._checkpoints.committed()
        return rows

    async def transact(self, work: Callable[[Run], T]) -> T:
        """``work(run)`` in one transaction, where ``run(compiled, values)`` runs one
        statement and returns its rows: committed when ``work`` returns; when it raises,
        or SQLite refuses anything (the write lock held elsewhere: nothing waits for it),
        rolled back, and ``Refused`` (or what ``work`` raised)."""
        driver = self._driver()
        try:
            driver.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise Refused(str(exc)) from exc
        try:
            result = work(lambda compiled, values: _run(driver, compiled, values))
            driver.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                driver.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise Refused(str(exc)) from exc
            raise
        self._checkpoints.committed()
        return result

    def _driver(self) -> sqlite3.Connection:
        if self._connection is None:
            self._connection = self._engine.raw_connection()
        return cast(sqlite3.Connection, self._connection.driver_connection)

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self._engine.dispose()


Run = Callable[[Compiled, Mapping[str, Any]], list[Row]]


def _run(driver: sqlite3.Connection, compiled: Compiled, values: Mapping[str, Any]) -> list[Row]:
    cursor = driver.execute(compiled.sql, bound(compiled.positional_params, values))
    fetched = cursor.fetchall()
    return compiled.rows(fetched, [None] * len(cursor.description or ()))
