"""The group commit's fast path on PostgreSQL (issue 14): one round trip per group.

Through the pool, a group of ``POST /jobs`` rows costs four round trips to PostgreSQL
(``BEGIN``, the ``INSERT``, the ``NOTIFY``, ``COMMIT``), a hop to a database thread and
back, and SQLAlchemy's execution machinery around each statement: about 1 ms a group on
this machine, most of a sequential submit's service time. Here the batcher owns one
connection of its own, in autocommit, driven from the event loop: the group's one
``INSERT … SELECT … FROM json_to_recordset(:rows) ON CONFLICT (idempotency_key) DO
NOTHING`` and its ``NOTIFY`` go out together in pipeline mode, and the ``Sync`` that ends
the pipeline commits them as one implicit transaction (without a ``NOTIFY``, the insert
alone, committed as it runs). Nothing is less durable: the answer still waits for
that commit (``synchronous_commit`` as the server has it), and a statement that fails
rolls the whole group back.

What this path does not decide, the pool's path does (``SubmitBatcher``): a group the
database refuses (``Refused``) is stored again there, where a bad row is bisected out and
answered alone; rows whose idempotency key was taken are skipped here and resolved there
(a replay, a mismatch, or a key expired and released). An unreachable database raises
``DatabaseUnavailable`` (503), as the pool's path does; the connection is opened again on
the next group."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import psycopg
import sqlalchemy as sa

from service.bulk import recordset_insert
from service.models import JobValues
from service.outage import OutageTracker
from service.pg_direct import (
    NOTIFY,
    Compiled,
    bound,
    connect_args,
    connect_wire,
    refusal,
    still_open,
    wire_dialect,
)
from service.pg_wire import Statement, WireConnection

# How the batcher's connection shows in pg_stat_activity.
APPLICATION_NAME = "celeriac-submit"
# Which of a group's rows were stored, when some were skipped.
FOUND = b"SELECT id FROM jobs WHERE id = ANY($1)"


class _Insert:
    """The group's ``INSERT … SELECT … FROM json_to_recordset(:rows) ON CONFLICT
    (idempotency_key) DO NOTHING`` for one set of row keys: the rows go as one JSON
    parameter, written as the pool's path writes them (``bulk.Recordset``: JSON values as
    written, timestamps in UTC), where forty parameters a row each cost psycopg a dump."""

    def __init__(self, dialect: sa.Dialect, keys: tuple[str, ...]) -> None:
        self.recordset, statement = recordset_insert(keys)
        conflict = sa.text(f"{statement.text} ON CONFLICT (idempotency_key) DO NOTHING")
        self.compiled = Compiled(conflict, dialect)

    def params(self, rows: Sequence[JobValues]) -> tuple[Any, ...]:
        return self.compiled.positional_params({"rows": self.recordset.rows_json(rows)})


class SubmitPipeline:
    """``insert(rows, notices)``: the rows stored and the notices sent in one commit;
    returns the ids of the rows skipped because their idempotency key was taken."""

    def __init__(self, engine: sa.Engine, outage: OutageTracker) -> None:
        self.dialect = wire_dialect(engine.dialect)
        self._connect_args = connect_args(engine, APPLICATION_NAME)
        self.outage = outage
        self._wire: WireConnection | None = None
        self._inserts: dict[tuple[str, ...], _Insert] = {}

    @classmethod
    def for_engine(cls, engine: sa.Engine, outage: OutageTracker) -> SubmitPipeline | None:
        """The pipeline where it applies: PostgreSQL through psycopg 3."""
        if engine.dialect.name != "postgresql" or engine.dialect.driver != "psycopg":
            return None
        return cls(engine, outage)

    async def insert(
        self, rows: Sequence[JobValues], notices: Sequence[tuple[str, str]]
    ) -> set[str]:
        insert = self._insert_for(rows[0])
        params = bound(insert.params, rows)
        started = time.monotonic()
        try:
            skipped = await self._send(
                (insert.compiled.sql_bytes, params), [r["id"] for r in rows], notices
            )
        except psycopg.Error as exc:
            await self._drop()  # a fresh connection for the next group, whatever broke
            raise refusal(exc, self.outage) from exc
        except BaseException:  # cancelled mid-pipeline: its state is unknown
            await self._drop()
            raise
        self.outage.succeeded(started)
        return skipped

    async def _send(
        self, insert: Statement, ids: list[str], notices: Sequence[tuple[str, str]]
    ) -> set[str]:
        wire = await self._connection()
        statements = [insert, *((NOTIFY, notice) for notice in notices)]
        inserted = (await wire.run(statements))[0]
        # Committed (autocommit, or the pipeline's Sync): the rowcount is the rows inserted.
        if inserted.rowcount == len(ids):
            return set()
        # ``ids`` are ours alone (a fresh UUIDv7 each): those missing had their key taken.
        (found,) = await wire.run([(FOUND, (ids,))])
        stored = {job_id for (job_id,) in found.rows}
        return {job_id for job_id in ids if job_id not in stored}

    def _insert_for(self, row: JobValues) -> _Insert:
        keys = tuple(row)
        insert = self._inserts.get(keys)
        if insert is None:
            insert = self._inserts[keys] = _Insert(self.dialect, keys)
        return insert

    async def _connection(self) -> WireConnection:
        if self._wire is not None and not still_open(self._wire.conn):
            await self._drop()
        if self._wire is None:
            self._wire = await connect_wire(self._connect_args)
        return self._wire

    async def _drop(self) -> None:
        wire, self._wire = self._wire, None
        if wire is not None:
            await asyncio.shield(wire.close())

    async def close(self) -> None:
        await self._drop()
