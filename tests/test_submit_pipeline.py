"""The group commit's fast path on PostgreSQL (service/pg_pipeline.py): a group's rows and
its NOTIFY in one pipelined implicit transaction on the batcher's own connection. In
process, on a real migrated PostgreSQL database: the same outcomes as the pool's path
for keys (replays, mismatches, expired keys, duplicates within a group), a refused row
still fails alone, the NOTIFY still rides the commit, and a connection the server closed
is replaced before a group is lost on it."""

from __future__ import annotations

import asyncio
import os
import select
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from conftest import migrated_database, selected_databases
from test_idempotency import TTL, check_mixed_outcomes, keyed, mixed_group, stored

from service import errors
from service.brokers.sql import CHANNEL, SqlBroker
from service.db import Database
from service.idempotency import Submitted
from service.pg_pipeline import APPLICATION_NAME
from service.runtime import Runtime
from service.settings import Settings
from service.signals import Signals

pytestmark = pytest.mark.skipif(
    "postgres" not in selected_databases(), reason="the pipeline is PostgreSQL's"
)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    with migrated_database("postgres", tmp_path) as database:
        yield database


def runtime_of(db: Database, listening: bool = False) -> Runtime:
    signals = Signals()
    broker = SqlBroker(db, signals, fallback_seconds=1.0)
    runtime = Runtime(Settings(idempotency_ttl_seconds=TTL), db, signals, broker)
    assert runtime.submits.pipeline is not None, "PostgreSQL through psycopg takes the pipeline"
    if listening:  # as started: the NOTIFY rides the commit (no listener thread needed)
        broker._listener = object()  # type: ignore[assignment]
    return runtime


async def submit_all(runtime: Runtime, rows: list[Any]) -> list[Any]:
    try:
        return await asyncio.gather(
            *(runtime.submits.submit(r) for r in rows), return_exceptions=True
        )
    finally:
        await runtime.submits.close()


def test_one_group_resolves_keys_as_the_pool_does(db: Database) -> None:
    live, old, group = mixed_group(db)
    outcomes = asyncio.run(submit_all(runtime_of(db), group))
    check_mixed_outcomes(db, live, old, outcomes)


def test_a_refused_row_fails_alone_and_the_rest_commit(db: Database) -> None:
    rows = [keyed(f"k{i}", args=[i]) for i in range(6)]
    rows[2]["task"] = None  # NOT NULL: the whole pipelined group rolls back first
    outcomes = asyncio.run(submit_all(runtime_of(db), rows))
    assert isinstance(outcomes[2], errors.JobNotStorable), outcomes
    good = [o for i, o in enumerate(outcomes) if i != 2]
    assert all(isinstance(o, Submitted) and not o.replayed for o in good), outcomes
    assert stored(db) == sorted(o.row["id"] for o in good)


def test_the_notify_rides_the_groups_commit(db: Database) -> None:
    with psycopg.connect(_libpq_url(db), autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        rows = [keyed(None, queue="q_heard"), keyed(None, queue="q_heard")]
        outcomes = asyncio.run(submit_all(runtime_of(db, listening=True), rows))
        assert all(isinstance(o, Submitted) for o in outcomes), outcomes
        select.select([listener.fileno()], [], [], 5)
        payloads = [n.payload for n in listener.notifies(timeout=1, stop_after=1)]
    assert any("q_heard" in payload for payload in payloads), payloads


def test_a_connection_the_server_closed_is_replaced_before_the_next_group(db: Database) -> None:
    async def scenario() -> list[Any]:
        runtime = runtime_of(db)
        try:
            first = await runtime.submits.submit(keyed(None))
            killed = db.run_sync(_terminate_pipeline)
            assert killed == 1, "the batcher's own connection, named in pg_stat_activity"
            second = await asyncio.gather(
                runtime.submits.submit(keyed(None)), return_exceptions=True
            )
            third = await runtime.submits.submit(keyed(None))
            return [first, *second, third]
        finally:
            await runtime.submits.close()

    outcomes = asyncio.run(scenario())
    # The dead connection is noticed before the next group goes out on it: no 503.
    assert all(isinstance(o, Submitted) for o in outcomes), outcomes
    assert stored(db) == sorted(o.row["id"] for o in outcomes)


def _terminate_pipeline(session: sa.orm.Session) -> int:
    query = sa.text(
        "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
        "WHERE application_name = :name AND datname = current_database()"
    )
    return int(session.execute(query, {"name": APPLICATION_NAME}).scalar_one())


def _libpq_url(db: Database) -> str:
    return db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


def test_a_connection_past_descriptor_1024_is_still_checked(db: Database) -> None:
    """A service with many clients holds more than 1,024 descriptors, past what
    ``select.select`` can watch: the check before each group must not fail there."""
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:

        async def scenario() -> list[Any]:
            runtime = runtime_of(db)
            try:
                first = await runtime.submits.submit(keyed(None))
                assert runtime.submits.pipeline is not None
                assert runtime.submits.pipeline._wire is not None
                assert runtime.submits.pipeline._wire.conn.fileno() > 1024
                return [first, await runtime.submits.submit(keyed(None))]
            finally:
                await runtime.submits.close()

        outcomes = asyncio.run(scenario())
    finally:
        for descriptor in held:
            os.close(descriptor)
    assert all(isinstance(o, Submitted) for o in outcomes), outcomes
