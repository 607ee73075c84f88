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
SLOW = b"SELECT pg_sleep(0.05)"  # its answer cannot be there before the unit waits


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    with migrated_database("postgres", tmp_path) as database:
        yield database


class CountingLoop(asyncio.SelectorEventLoop):
    """The standard event loop, counting the readers added to it and telling when one is
    removed."""

    def __init__(self) -> None:
        super().__init__()
        self.readers_added = 0
        self.reader_removed = asyncio.Event()

    def add_reader(self, fd: Any, callback: Callable[..., object], *args: Any) -> None:
        self.readers_added += 1
        super().add_reader(fd, callback, *args)

    def remove_reader(self, fd: Any) -> bool:
        self.reader_removed.set()
        return super().remove_reader(fd)

    async def until_a_reader_is_removed(self) -> None:
        async with asyncio.timeout(5):
            await self.reader_removed.wait()


def on_wire(
    db: Database, work: Callable[[WireConnection], Awaitable[T]], loop: CountingLoop | None = None
) -> T:
    async def scenario() -> T:
        wire = await connect_wire(connect_args(db.engine, "celeriac-test"))
        try:
            await wire.conn.execute(
                "CREATE TABLE IF NOT EXISTS wire_probe (n int PRIMARY KEY, note text)"
            )
            return await work(wire)
        finally:
            await wire.close()

    with asyncio.Runner(loop_factory=lambda: loop or CountingLoop()) as runner:
        return runner.run(scenario())


def backend_pid(wire: WireConnection) -> int:
    return wire.conn.info.backend_pid


def server_side(db: Database, sql: str, *params: Any) -> None:
    url = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql, params)


def test_a_units_statements_commit_together_or_not_at_all(db: Database) -> None:
    async def work(wire: WireConnection) -> tuple[int, int]:
        [one, two] = await wire.run([(INSERT, (1, "a")), (INSERT, (2, None))])
        with pytest.raises(psycopg.errors.UniqueViolation):  # the second refuses: neither stays
            await wire.run([(INSERT, (3, "c")), (INSERT, (1, "again"))])
        fresh = await connect_wire(connect_args(db.engine, "celeriac-test"))
        try:
            [(count,)] = (await fresh.run([(COUNT, ())]))[0].rows
        finally:
            await fresh.close()
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


def test_the_socket_is_watched_once_per_connection_not_per_statement(db: Database) -> None:
    """Adding and removing a reader around each wait cost a dozen system calls on
    uvloop: the socket stays watched from one statement to the next."""
    loop = CountingLoop()

    async def work(wire: WireConnection) -> list[int]:
        added = loop.readers_added
        for n in range(20):  # each unit takes a while: each waits for its answer
            await wire.run([(INSERT, (n, None)), (b"SELECT pg_sleep(0.01)", ())])
        [(count,)] = (await wire.run([(COUNT, ())]))[0].rows
        return [count, loop.readers_added - added]

    assert on_wire(db, work, loop) == [20, 1]


def test_a_connection_readable_while_idle_stops_being_watched_and_works_after(
    db: Database,
) -> None:
    """A notification arrives on the idle connection: nobody waits for it, so the watch
    ends (an idle socket left readable would otherwise wake the loop on every turn), and
    the next statement watches the socket again."""
    loop = CountingLoop()

    async def work(wire: WireConnection) -> tuple[int, bool, int]:
        added = loop.readers_added  # (psycopg's own, while it connected)
        # A unit that takes a while, so that it waits and watches the socket: an answer
        # already there when it is read for the first time (a loaded machine) needs no
        # watch, and the socket would not be watched yet.
        await wire.run([(b"LISTEN wire_probe", ()), (SLOW, ())])
        assert wire._watching is loop
        loop.reader_removed.clear()  # (psycopg removed its own)
        await asyncio.to_thread(server_side, db, "SELECT pg_notify('wire_probe', 'x')")
        await loop.until_a_reader_is_removed()
        assert wire._watching is None
        # (a statement that takes a while: its answer cannot be there before it waits)
        [answer, _] = await wire.run([(b"SELECT $1::int * 2", (21,)), (SLOW, ())])
        return answer.rows[0][0], wire._watching is loop, loop.readers_added - added

    assert on_wire(db, work, loop) == (42, True, 2)


def test_an_idle_connection_the_server_ended_fails_its_next_statement_without_hanging(
    db: Database,
) -> None:
    loop = CountingLoop()

    async def work(wire: WireConnection) -> None:
        await wire.run([(COUNT, ()), (SLOW, ())])  # it waits: the socket is watched
        assert wire._watching is loop
        loop.reader_removed.clear()  # (psycopg removed its own)
        await asyncio.to_thread(
            server_side, db, "SELECT pg_terminate_backend(%s)", backend_pid(wire)
        )
        await loop.until_a_reader_is_removed()  # its end of file was seen, once
        assert wire._watching is None
        async with asyncio.timeout(5):
            await wire.run([(COUNT, ())])

    with pytest.raises(psycopg.OperationalError):
        on_wire(db, work, loop)
