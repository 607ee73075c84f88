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

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any, cast

import sqlalchemy as sa

from service.db import _create_sqlite_engine
from service.pg_direct import Compiled, Direct, Refused, Row, Step, bound


class DirectSqlite(Direct):
    """``fetch(compiled, values)``: run one statement; the rows it returned."""

    def __init__(self, engine: sa.Engine) -> None:
        super().__init__(engine.dialect)
        # Its own engine of one connection, with the pool's pragmas (WAL, synchronous),
        # checked out once: every statement here runs on the event loop, one at a time.
        self._engine = _create_sqlite_engine(engine.url, busy_timeout_ms=0, pool_size=1)
        self._connection: Any = None  # the pool's wrapper, holding the checkout

    @classmethod
    def for_engine(cls, engine: sa.Engine) -> DirectSqlite | None:
        """The direct path where it applies: SQLite on a file (each connection to an
        in-memory database would have a database of its own)."""
        if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
            return None
        return cls(engine)

    async def fetch(
        self,
        compiled: Compiled,
        values: Mapping[str, Any],
        notices: Sequence[tuple[str, str]] = (),
        first: Sequence[Step] = (),
    ) -> list[Row]:
        """As ``DirectPg.fetch``, for one statement: SQLite has no notices, and nothing
        here runs statements ahead of another."""
        if notices or first:
            raise Refused("one statement at a time on SQLite's direct path")
        params = bound(compiled.positional_params, values)
        try:
            cursor = self._driver().execute(compiled.sql, params)
            fetched = cursor.fetchall()
        except sqlite3.Error as exc:  # autocommit: a failed statement changed nothing
            raise Refused(str(exc)) from exc
        return compiled.rows(fetched, cursor.description or ())

    def _driver(self) -> sqlite3.Connection:
        if self._connection is None:
            self._connection = self._engine.raw_connection()
        return cast(sqlite3.Connection, self._connection.driver_connection)

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self._engine.dispose()
