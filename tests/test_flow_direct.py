"""Flow control's claim of a broker's candidates on the direct path (service/flow_direct.py)
against the pool's (``flow.claim_by_ids``), in process on a real migrated PostgreSQL
database: the same jobs granted and left blocked for every kind of rule (a pattern's
``max_running``, a rate, a queue's own limit, a pause, a job with two keys), counts that
see what earlier claims committed, slots freed by a settle and rate windows that pass,
and a stale snapshot of the rules left to the pool's path with nothing sent.

(HTTP and Redis workers sharing one limit, where Redis arbitrates the slots inside this
claim, run end to end in tests/test_flow_invariants.py.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import free_port, migrated_database, selected_databases

from service import flow, flow_direct
from service.brokers.sql import SqlBroker
from service.db import Database, create_engine
from service.dispatch import PLAIN_RETRY_SECONDS
from service.effects import Effects
from service.jobs import Defaults, insert_jobs, new_job
from service.leases import LeaseTerms, Settle, new_token, settle
from service.models import JOBS_TABLE, LIMIT_GRANTS_TABLE, JobValues
from service.pg_direct import DirectPg, Refused
from service.runtime import Runtime
from service.schemas import JobSubmit, LimitSpec, QueuePatch
from service.settings import Settings
from service.signals import Signals
from service.states import JobStatus, Outcome

pytestmark = pytest.mark.skipif(
    "postgres" not in selected_databases(), reason="the direct path is PostgreSQL's"
)

# label -> (queue, limits), in submission order (ids grow with it: the claim's order)
JOBS: dict[str, tuple[str, list[str]]] = {
    "a1": ("q_fd", ["fd-a"]),
    "a2": ("q_fd", ["fd-a"]),
    "a3": ("q_fd", ["fd-a"]),  # fd-* allows 2 running per key
    "b1": ("q_fd", ["fd-b"]),
    "r1": ("q_fd", ["rt-x"]),
    "r2": ("q_fd", ["rt-x"]),
    "r3": ("q_fd", ["rt-x"]),  # rt-x allows 2 grants a minute
    "both": ("q_fd", ["fd-b", "rt-x"]),  # fd-b has room, rt-x has none
    "c1": ("q_capped", []),
    "c2": ("q_capped", []),  # q_capped's own limit: 1 running
    "p1": ("q_paused", []),  # neither granted nor blocked: its queue is paused
    "plain": ("q_fd", []),
}
GRANTED = {"a1", "a2", "b1", "r1", "r2", "c1", "plain"}
BLOCKED = {"a3", "r3", "both", "c2"}


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    with migrated_database("postgres", tmp_path) as database:
        yield database


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC)


def configured(db: Database, now: datetime) -> dict[str, str]:
    """The rules above and one job per label: label -> id."""

    def work(session: Any) -> None:
        flow.put_limit(session, "fd-*", LimitSpec(max_running=2), now)
        flow.put_limit(
            session, "rt-*", LimitSpec.model_validate({"rate": {"limit": 2, "period": 60}}), now
        )
        flow.patch_queue(session, "q_capped", QueuePatch(max_running=1), now)
        flow.patch_queue(session, "q_paused", QueuePatch(paused=True), now)

    db.run_sync(work)
    ids = {}
    for label, (queue, limits) in JOBS.items():
        row = new_job(
            JobSubmit(task="t", queue=queue, limits=limits or None), now, Defaults(max_retries=0)
        )
        db.run_sync(lambda session, row=row: insert_jobs(session, [row]))
        ids[label] = row["id"]
    db.run_sync(flow.snapshot)  # the rules as this process knows them, fresh
    return ids


def terms(now: datetime) -> LeaseTerms:
    return LeaseTerms("w", new_token(), now, 30.0, 30.0)


def direct_claim(db: Database, ids: list[str], at: datetime) -> flow_direct.Claimed:
    async def run() -> flow_direct.Claimed:
        signals = Signals()
        runtime = Runtime(Settings(), db, signals, SqlBroker(db, signals, fallback_seconds=1.0))
        assert isinstance(runtime.direct, DirectPg)
        try:
            return await flow_direct.claim_by_ids(runtime.direct, db.engine, ids, terms(at), None)
        finally:
            await runtime.close()

    return asyncio.run(run())


def labels(ids: dict[str, str], rows: list[JobValues]) -> set[str]:
    named = {job_id: label for label, job_id in ids.items()}
    return {named[row["id"]] for row in rows}


def test_the_direct_claim_decides_as_the_pools_claim(tmp_path: Path, now: datetime) -> None:
    with migrated_database("postgres", tmp_path / "pool") as pool_db:
        pool_ids = configured(pool_db, now)
        pooled = pool_db.run_sync(
            lambda session: flow.claim_by_ids(session, list(pool_ids.values()), terms(now))
        )
    with migrated_database("postgres", tmp_path / "direct") as db:
        ids = configured(db, now)
        claimed = direct_claim(db, list(ids.values()), now)
        assert labels(ids, claimed.granted) == labels(pool_ids, pooled) == GRANTED
        assert labels(ids, claimed.blocked) == BLOCKED
        # Granted as a lease: running under the claim's token, each key's row written.
        token = claimed.granted[0]["lease_token"]
        assert {row["lease_token"] for row in claimed.granted} == {token}
        held = db.run_sync(
            lambda session: (
                session.execute(
                    sa.select(JOBS_TABLE.c.status).where(
                        JOBS_TABLE.c.id.in_([row["id"] for row in claimed.granted])
                    )
                )
                .scalars()
                .all()
            )
        )
        assert set(held) == {JobStatus.running}
        keys = ["fd-a", "fd-b", "rt-x", "queue/q_capped"]
        counts = db.run_sync(lambda session: flow.running_counts(session, keys))
        assert counts == {"fd-a": 2, "fd-b": 1, "rt-x": 2, "queue/q_capped": 1}


def test_later_claims_count_what_earlier_ones_committed(db: Database, now: datetime) -> None:
    ids = configured(db, now)
    first = direct_claim(db, list(ids.values()), now)
    waiting = [ids[label] for label in sorted(BLOCKED)]
    assert direct_claim(db, waiting, now).granted == []  # every key is as full as it was
    # A settle frees a1's slot of fd-a: a3 may run; r3 still waits for rt-x's window.
    [a1] = [row for row in first.granted if row["id"] == ids["a1"]]
    report = Settle(a1["id"], a1["lease_token"], Outcome.succeeded)
    db.run_sync(lambda session: settle(session, [report], now, Effects()))
    assert labels(ids, direct_claim(db, waiting, now).granted) == {"a3"}
    # A minute later the rate's window has passed, and rt-x grants two again.
    later = now + timedelta(seconds=61)
    db.run_sync(flow.snapshot)
    assert labels(ids, direct_claim(db, waiting, later).granted) == {"r3", "both"}


def test_a_stale_snapshot_of_the_rules_is_left_to_the_pools_path(
    db: Database, now: datetime
) -> None:
    ids = configured(db, now)
    state = flow.state_of(db.engine)
    assert state.snapshot is not None
    state.snapshot = replace(state.snapshot, read_at=state.snapshot.read_at - flow.SNAPSHOT_SECONDS)
    with pytest.raises(Refused):
        direct_claim(db, list(ids.values()), now)
    grants = db.run_sync(
        lambda session: session.execute(
            sa.select(sa.func.count()).select_from(LIMIT_GRANTS_TABLE)
        ).scalar_one()
    )
    assert grants == 0
    statuses = db.run_sync(
        lambda session: set(session.execute(sa.select(JOBS_TABLE.c.status)).scalars())
    )
    assert statuses == {JobStatus.queued}


def test_after_a_batch_of_limited_jobs_flow_control_takes_the_next_whole(
    db: Database, now: datetime
) -> None:
    """Under flow control the dispatcher first grants the candidates that name no limits
    in one plain statement. A batch where that granted nothing (every job named limits)
    makes flow control's claim take the next batches whole, jobs without limits too,
    for ``PLAIN_RETRY_SECONDS``; then the plain statement is tried again."""
    ids = configured(db, now)

    async def run() -> list[set[str]]:
        signals = Signals()
        runtime = Runtime(Settings(), db, signals, SqlBroker(db, signals, fallback_seconds=1.0))
        direct, dispatcher = runtime.direct, runtime.dispatcher
        assert isinstance(direct, DirectPg)
        plain_statements = []
        fetch = direct.fetch

        async def counted(*args: Any, **kwargs: Any) -> Any:
            plain_statements.append(args[0])
            return await fetch(*args, **kwargs)

        direct.fetch = counted  # type: ignore[method-assign]  # a spy: the real call runs
        try:
            batches = [[ids["a1"], ids["b1"]], [ids["plain"], ids["c1"]], [ids["r1"]]]
            granted: list[set[str]] = []
            for batch in batches[:2]:
                granted.append(labels(ids, await dispatcher._claim_ids(batch, lambda: terms(now))))
            assert len(plain_statements) == 1  # only the first batch's
            dispatcher._all_limited_at -= PLAIN_RETRY_SECONDS
            granted.append(labels(ids, await dispatcher._claim_ids(batches[2], lambda: terms(now))))
            assert len(plain_statements) == 2
            return granted
        finally:
            await runtime.close()

    assert asyncio.run(run()) == [{"a1", "b1"}, {"plain", "c1"}, {"r1"}]


def test_a_settle_that_committed_is_not_failed_by_its_announcement(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The jobs a freed slot lets through are read after the settle's commit: with the
    database gone by then, that read is logged and left to the reconciler, and the
    settle is not answered 503 (it committed)."""
    db = Database(create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/gone"))
    try:
        state = flow.state_of(db.engine)
        state.reoffers, state.held["fd-a"] = True, time.monotonic()
        row: Any = {"id": "j", "queue": "q_fd", "limit_key": "fd-a"}
        effects = Effects()
        asyncio.run(flow.freed_after_commit(db, [row], effects))
    finally:
        db.dispose()
    assert effects.dispatch == []
    assert "announcing the jobs that freed limit slots let through failed" in caplog.text
