"""Issue 14: the direct path's statements that read the same on PostgreSQL and SQLite (a
queue's claim, a job read: ``Runtime.loop_direct``), on each database against the pool's
path they stand in for: the same values read, the same rows written. On SQLite
(service/sqlite_direct.py) a statement that meets another connection's write lock waits
for nothing and changes nothing: the caller takes the pool's path."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import migrated_database, selected_databases

from service import jobs, waiting
from service.brokers.sql import SqlBroker
from service.db import Database, create_engine
from service.effects import Effects
from service.idempotency import insert_skipping_taken_direct
from service.jobs import Defaults, insert_jobs, new_job
from service.leases import (
    LeaseTerms,
    Settle,
    claim_queue,
    claim_queue_direct,
    settle,
    settle_succeeded_sqlite,
)
from service.models import JOBS_TABLE, JobValues
from service.pg_direct import Refused
from service.runtime import Clock, Runtime
from service.schemas import JobSubmit
from service.settings import Settings
from service.signals import Signals
from service.sqlite_direct import DirectSqlite
from service.states import Outcome

DATABASES = [kind for kind in ("postgres", "sqlite") if kind in selected_databases()]
KWARGS = {"b": 1, "a": [None, 1.5, "x", {"z": 2**70}]}
RESULT = {"zeta": [1, None], "alpha": 2**66}


@pytest.fixture(params=DATABASES)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    with migrated_database(request.param, tmp_path) as database:
        yield database


def runtime_of(db: Database) -> Runtime:
    signals = Signals()
    runtime = Runtime(Settings(), db, signals, SqlBroker(db, signals, fallback_seconds=1.0))
    assert runtime.loop_direct is not None, "PostgreSQL and SQLite on a file take it"
    return runtime


def jobs_in(db: Database, n: int, queue: str, priority: int = 0) -> list[JobValues]:
    now = Clock().now()
    spec = JobSubmit(task="tests.direct", queue=queue, kwargs=KWARGS, priority=priority)
    rows = [new_job(spec, now, Defaults(max_retries=1, result_ttl=12.5)) for _ in range(n)]
    db.run_sync(lambda session: insert_jobs(session, rows))
    return rows


def stored(db: Database, job_id: str) -> dict[str, Any]:
    query = sa.select(JOBS_TABLE).where(JOBS_TABLE.c.id == job_id)
    return db.run_sync(lambda session: dict(session.execute(query).mappings().one()))


def terms() -> LeaseTerms:
    return LeaseTerms(worker="w1", token="tok", now=Clock().now(), lease_seconds=None,
                      default_seconds=30.0, key_id="k1")  # fmt: skip


def without(row: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in keys}


def test_a_job_reads_the_same_as_through_the_pool(db: Database) -> None:
    [job] = jobs_in(db, 1, "q_read")
    runtime = runtime_of(db)

    async def both() -> tuple[JobValues, JobValues]:
        try:
            direct = await waiting.read_values(runtime, job["id"])
            pooled = await runtime.db.read(lambda session: waiting._read(session, job["id"]))
            return direct, pooled
        finally:
            await runtime.close()

    direct, pooled = asyncio.run(both())
    assert direct == pooled
    assert list(direct["kwargs"]) == ["b", "a"] and direct["kwargs"] == KWARGS
    assert direct["created_at"].utcoffset() == timedelta(0)


LEASE_COLUMNS = ("status", "attempt", "lease_token", "lease_worker", "lease_key")


def test_a_queue_claim_grants_as_the_pool_does(db: Database) -> None:
    jobs_in(db, 2, "q_direct_a", priority=5)
    jobs_in(db, 1, "q_direct_a", priority=9)
    jobs_in(db, 3, "q_direct_b", priority=5)
    jobs_in(db, 1, "q_direct_b", priority=9)
    runtime = runtime_of(db)
    granted = terms()

    async def claims() -> list[list[JobValues]]:
        direct = runtime.loop_direct
        assert direct is not None
        try:  # (one event loop: PostgreSQL's connections here belong to it)
            return [
                await claim_queue_direct(direct, "q_direct_a", want, granted) for want in (2, 5, 5)
            ]
        finally:
            await runtime.close()

    claimed, rest, nothing = asyncio.run(claims())
    pooled = db.run_sync(lambda session: claim_queue(session, "q_direct_b", 2, granted))
    assert [r["priority"] for r in claimed] == [9, 5] == [r["priority"] for r in pooled]
    assert [without(r, "id", "queue") for r in claimed] == [
        without(r, "id", "queue") for r in pooled
    ]
    for direct_row, pooled_row in zip(claimed, pooled, strict=True):
        first, second = stored(db, direct_row["id"]), stored(db, pooled_row["id"])
        assert [first[c] for c in LEASE_COLUMNS] == [second[c] for c in LEASE_COLUMNS]
        assert first["status"] == "running" and first["attempt"] == 1
    # What is left: one job, granted once.
    assert [r["priority"] for r in rest] == [5] and nothing == []


@pytest.mark.skipif("sqlite" not in DATABASES, reason="SQLite's write lock")
def test_on_sqlite_a_held_write_lock_refuses_at_once_and_changes_nothing(tmp_path: Path) -> None:
    with migrated_database("sqlite", tmp_path) as db:
        [job] = jobs_in(db, 1, "q_locked")
        direct = DirectSqlite.for_engine(db.engine)
        assert direct is not None
        holder = sqlite3.connect(str(db.engine.url.database), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another connection (a thread, a process) writes

        async def claim() -> list[JobValues]:
            assert direct is not None
            return await claim_queue_direct(direct, "q_locked", 1, terms())

        try:
            with pytest.raises(Refused):
                asyncio.run(claim())
            status = holder.execute("SELECT status FROM jobs WHERE id = ?", (job["id"],))
            assert status.fetchall() == [("queued",)]
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert [row["id"] for row in asyncio.run(claim())] == [job["id"]]
        asyncio.run(direct.close())


@pytest.mark.skipif("sqlite" not in DATABASES, reason="SQLite's direct settle")
def test_on_sqlite_a_success_settles_as_settle_writes_it(tmp_path: Path) -> None:
    """``settle_succeeded_sqlite``: the same row as ``settle`` writes (the result's expiry
    to the microsecond), the same effects; a stale token is left to ``settle``, and a held
    write lock refuses the whole batch, changing nothing."""
    with migrated_database("sqlite", tmp_path) as db:
        first, second, third = jobs_in(db, 3, "q_settle")
        granted = terms()
        db.run_sync(lambda session: claim_queue(session, "q_settle", 3, granted))
        direct = DirectSqlite.for_engine(db.engine)
        assert direct is not None
        now, effects = Clock().now(), Effects()
        batch = [
            Settle(first["id"], "tok", Outcome.succeeded, result=RESULT),
            Settle(second["id"], "stale", Outcome.succeeded, result=RESULT),
        ]

        async def direct_settle(reports: list[Settle], into: Effects) -> dict[str, JobValues]:
            assert direct is not None
            return await settle_succeeded_sqlite(
                direct, reports, now, into, key_id="k1", waited=lambda _: True
            )

        settled = asyncio.run(direct_settle(batch, effects))
        assert list(settled) == [first["id"]]  # the stale report is left to settle
        pooled = Effects()
        other = Settle(second["id"], "tok", Outcome.succeeded, result=RESULT)
        db.run_sync(lambda session: settle(session, [other], now, pooled, key_id="k1"))
        direct_row, pooled_row = stored(db, first["id"]), stored(db, second["id"])
        assert without(direct_row, "id") == without(pooled_row, "id")
        assert direct_row["result_expires_at"] == now + timedelta(seconds=12.5)
        assert list(direct_row["result"]) == ["zeta", "alpha"]
        assert settled[first["id"]] == direct_row == effects.settled[first["id"]]
        [ended], [pooled_ended] = effects.ended, pooled.ended
        assert without(asdict(ended), "id") == without(asdict(pooled_ended), "id")
        holder = sqlite3.connect(str(db.engine.url.database), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            late = [Settle(third["id"], "tok", Outcome.succeeded, result=1)]
            with pytest.raises(Refused):
                asyncio.run(direct_settle(late, Effects()))
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert stored(db, third["id"])["status"] == "running"
        asyncio.run(direct.close())


@pytest.mark.skipif("sqlite" not in DATABASES, reason="SQLite's direct submit")
def test_on_sqlite_a_submit_group_stores_as_the_pool_does(tmp_path: Path) -> None:
    """``insert_skipping_taken_direct``: the group commit's one transaction on the loop's
    connection writes the row the pool's insert writes; a row whose idempotency key is
    taken is skipped and named (the batcher resolves it on the pool's path: a replay),
    and a held write lock refuses the whole group, changing nothing."""
    with migrated_database("sqlite", tmp_path) as db:
        now, defaults = Clock().now(), Defaults(max_retries=1, result_ttl=12.5)
        spec = JobSubmit(task="tests.direct", queue="q_submit", kwargs=KWARGS)

        def row(key: str | None) -> JobValues:
            values = new_job(spec, now, defaults)
            values.update({"idempotency_key": key, "request_hash": key and "h"})
            return values

        pooled, direct_row, keyed, again = row(None), row(None), row("k-1"), row("k-1")
        db.run_sync(lambda session: insert_jobs(session, [pooled]))
        direct = DirectSqlite.for_engine(db.engine)
        assert direct is not None

        async def insert(rows: list[JobValues]) -> set[str]:
            assert direct is not None
            return await insert_skipping_taken_direct(direct, rows)

        assert asyncio.run(insert([direct_row, keyed])) == set()
        assert without(stored(db, direct_row["id"]), "id") == without(
            stored(db, pooled["id"]), "id"
        )
        assert stored(db, keyed["id"])["idempotency_key"] == "k-1"
        assert asyncio.run(insert([again, row(None)])) == {again["id"]}  # the key is taken
        holder = sqlite3.connect(str(db.engine.url.database), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        late = row(None)
        try:
            with pytest.raises(Refused):
                asyncio.run(insert([late]))
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        count = sa.select(sa.func.count()).select_from(JOBS_TABLE)
        assert db.run_sync(lambda session: session.execute(count).scalar_one()) == 4
        asyncio.run(direct.close())


@pytest.mark.skipif("sqlite" not in DATABASES, reason="SQLite's direct submit")
def test_on_sqlite_the_group_commit_takes_the_direct_path_and_still_replays(
    tmp_path: Path,
) -> None:
    with migrated_database("sqlite", tmp_path) as db:
        runtime = runtime_of(db)
        spec = JobSubmit(task="tests.direct", queue="q_batcher")

        def keyed(key: str) -> JobValues:
            values = new_job(spec, Clock().now(), Defaults(max_retries=1, result_ttl=1.0))
            values.update({"idempotency_key": key, "request_hash": jobs.request_hash(spec)})
            return values

        async def submits() -> list[Any]:
            try:
                first = await runtime.submits.submit(keyed("same"))
                replay = await runtime.submits.submit(keyed("same"))
                return [first, replay]
            finally:
                await runtime.close()

        first, replay = asyncio.run(submits())
        direct = runtime.loop_direct
        assert direct is not None and any(
            key[0] == "insert skipping taken keys" for key in direct._statements
        )
        assert not first.replayed and replay.replayed and replay.row["id"] == first.row["id"]


def test_only_a_database_file_takes_sqlites_direct_path(tmp_path: Path) -> None:
    memory = sa.create_engine("sqlite://")
    assert DirectSqlite.for_engine(memory) is None  # each connection: a database of its own
    memory.dispose()
    on_file = create_engine(f"sqlite:///{tmp_path / 'direct.db'}")
    direct = DirectSqlite.for_engine(on_file)
    assert direct is not None
    asyncio.run(direct.close())
    on_file.dispose()
