"""service/pg_wire.py against a real PostgreSQL: a unit's statements commit together or
not at all, values go and come back as psycopg dumps and loads them, a statement is
prepared once per connection (and past the cap runs unprepared), and failures are
psycopg's own exceptions."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from conftest import migrated_database, selected_databases

from service import pg_wire
from service.db import Database
from service.pg_direct import connect_args, connect_wire
from service.pg_wire import WireConnection

pytestmark = pytest.mark.skipif(
    "postgres" not in selected_databases(), reason="the wire path is PostgreSQL's"
)
T = TypeVar("T")
INSERT = b"INSERT INTO wire_probe (n, note) VALUES ($1, $2)"
COUNT = b"SELECT count(*) FROM wire_probe"


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    with migrated_database("postgres", tmp_path) as database:
        yield database


def on_wire(db: Database, work: Callable[[WireConnection], Awaitable[T]]) -> T:
    async def scenario() -> T:
        wire = await connect_wire(connect_args(db.engine, "celeriac-test"))
        try:
            await wire.conn.execute(
                "CREATE TABLE IF NOT EXISTS wire_probe (n int PRIMARY KEY, note text)"
            )
            return await work(wire)
        finally:
            await wire.conn.close()

    return asyncio.run(scenario())


def test_a_units_statements_commit_together_or_not_at_all(db: Database) -> None:
    async def work(wire: WireConnection) -> tuple[int, int]:
        [one, two] = await wire.run([(INSERT, (1, "a")), (INSERT, (2, None))])
        with pytest.raises(psycopg.errors.UniqueViolation):  # the second refuses: neither stays
            await wire.run([(INSERT, (3, "c")), (INSERT, (1, "again"))])
        fresh = await connect_wire(connect_args(db.engine, "celeriac-test"))
        try:
            [(count,)] = (await fresh.run([(COUNT, ())]))[0].rows
        finally:
            await fresh.conn.close()
        return one.rowcount + two.rowcount, count

    assert on_wire(db, work) == (2, 2)


def test_values_go_and_come_back_as_psycopg_has_them(db: Database) -> None:
    now = datetime(2026, 12, 7, 10, 0, 0, 123456, tzinfo=UTC)
    values = (7, "é\u2028", None, now, [1, 2], 2**62)
    sql = b"SELECT $1::int, $2::text, $3::text, $4::timestamptz, $5::int[], $6::bigint"

    async def work(wire: WireConnection) -> list[tuple[Any, ...]]:
        answers = [await wire.run([(sql, values)]) for _ in range(3)]
        return [answer.rows[0] for [answer] in answers]

    assert on_wire(db, work) == [values] * 3


def test_a_statement_is_prepared_once_and_past_the_cap_runs_unprepared(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_wire, "MAX_PREPARED", 2)

    async def prepared(wire: WireConnection) -> list[str]:
        cursor = await wire.conn.execute("SELECT name FROM pg_prepared_statements ORDER BY name")
        return [name for (name,) in await cursor.fetchall()]

    async def work(wire: WireConnection) -> tuple[list[str], list[int]]:
        seen = []
        for n in range(4):  # the same two statements again and again: two names
            [answer] = await wire.run([(b"SELECT $1::int + 1", (n,))])
            seen.append(answer.rows[0][0])
            await wire.run([(b"SELECT $1::int + 2", (n,))])
        for n in range(3):  # past the cap: answered, not kept
            [answer] = await wire.run([(b"SELECT $1::int + 3", (n,))])
            seen.append(answer.rows[0][0])
        return await prepared(wire), seen

    names, seen = on_wire(db, work)
    assert names == ["_celeriac_0", "_celeriac_1"]
    assert seen == [1, 2, 3, 4, 3, 4, 5]


def test_a_refusal_is_psycopgs_error_of_its_sqlstate(db: Database) -> None:
    async def work(wire: WireConnection) -> None:
        await wire.run([(b"SELECT 1 / $1::int", (0,))])

    with pytest.raises(psycopg.errors.DivisionByZero):
        on_wire(db, work)
