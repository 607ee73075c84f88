"""Idempotency keys in the group commit (service/idempotency.py). In process, on a real
migrated database: one group's look-up resolves replays, mismatches, expired keys and
duplicates within the group, and a row the database refuses still fails alone. Across
replicas: two processes may store the same key in concurrent transactions; the unique
index lets one win, and the loser's group looks its keys up again and replays it."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Api, Spawner, migrated_database, selected_databases

from service import errors
from service.brokers.sql import SqlBroker
from service.db import Database
from service.idempotency import Submitted, store_group
from service.jobs import Defaults, new_job, request_hash, scoped_idempotency_key
from service.models import JOBS_TABLE, JobValues
from service.runtime import Clock, Runtime
from service.schemas import JobSubmit
from service.settings import Settings
from service.signals import Signals

DATABASES = selected_databases()
TTL = 60.0


@pytest.fixture(params=DATABASES)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    with migrated_database(str(request.param), tmp_path) as database:
        yield database


def keyed(key: str | None, queue: str = "q_idem", ago: float = 0.0, **spec: Any) -> JobValues:
    """A job row as ``submit_one`` builds it, created ``ago`` seconds before now."""
    submit = JobSubmit(task="tests.idem", queue=queue, **spec)
    now = Clock().now().replace(microsecond=0) - timedelta(seconds=ago)
    row = new_job(submit, now, Defaults(max_retries=0))
    if key is not None:
        row.update(idempotency_key=key, request_hash=request_hash(submit))
    return row


def stored(db: Database, queue: str = "q_idem") -> list[str]:
    query = sa.select(JOBS_TABLE.c.id).where(JOBS_TABLE.c.queue == queue)
    return sorted(db.run_sync(lambda session: list(session.scalars(query))))


def mixed_group(db: Database) -> tuple[JobValues, JobValues, list[JobValues]]:
    """A job holding a live key, one holding an expired key (both stored), and a group
    that meets every case of a key. ``check_mixed_outcomes`` says what it must give."""
    live, old = keyed("live", args=[1]), keyed("old", args=[1], ago=TTL + 5)
    db.run_sync(lambda session: store_group(session, [live, old], TTL))
    group = [
        keyed("live", args=[1]),  # a live key, same body: its job
        keyed("live", args=[2]),  # a live key, another body: refused
        keyed("old", args=[2]),  # an expired key: released, a new job
        keyed("new", args=[1]),  # first of the group with this key: a new job
        keyed("new", args=[1]),  # later ones replay it...
        keyed("new", args=[3]),  # ...or are refused
        keyed(None),  # no key: always a new job
        keyed(None),
    ]
    return live, old, group


def check_mixed_outcomes(
    db: Database, live: JobValues, old: JobValues, outcomes: list[Any]
) -> list[Submitted]:
    """The outcomes of ``mixed_group``'s group, and what is stored after it; returns the
    submitted ones."""
    assert [type(o).__name__ for o in outcomes] == [
        "Submitted",
        "IdempotencyMismatch",
        *["Submitted"] * 3,
        "IdempotencyMismatch",
        *["Submitted"] * 2,
    ]
    done = [o for o in outcomes if isinstance(o, Submitted)]
    assert [o.replayed for o in done] == [True, False, False, True, False, False]
    assert done[0].row["id"] == live["id"] and done[3].row["id"] == done[2].row["id"]
    assert done[1].row["id"] != old["id"]
    inserted = [o.row["id"] for o in done if not o.replayed]
    assert stored(db) == sorted([live["id"], old["id"], *inserted])
    return done


def test_one_group_resolves_replays_mismatches_expiry_and_duplicates(db: Database) -> None:
    live, old, group = mixed_group(db)
    outcomes = db.run_sync(lambda session: store_group(session, group, TTL))
    done = check_mixed_outcomes(db, live, old, list(outcomes))
    # The expired job gave its key up; the new one holds it.
    again = db.run_sync(lambda session: store_group(session, [keyed("old", args=[2])], TTL))
    assert again == [Submitted(done[1].row, replayed=True)]


def test_keys_are_scoped_per_api_key(db: Database) -> None:
    rows = [keyed(scoped_idempotency_key(key_id, "same"), args=[1]) for key_id in ("k1", "k2")]
    outcomes = db.run_sync(lambda session: store_group(session, rows, TTL))
    assert [o.replayed for o in outcomes if isinstance(o, Submitted)] == [False, False]
    assert len(stored(db)) == 2


async def _submit_concurrently(db: Database, rows: list[JobValues]) -> list[Any]:
    signals = Signals()
    broker = SqlBroker(db, signals, fallback_seconds=1.0)
    runtime = Runtime(Settings(idempotency_ttl_seconds=TTL), db, signals, broker)
    submits = [runtime.submits.submit(row) for row in rows]
    return await asyncio.gather(*submits, return_exceptions=True)


def test_a_refused_keyed_row_fails_alone(db: Database) -> None:
    """A NOT NULL the database enforces (every dialect: IntegrityError, like a key taken
    by a concurrent group): the group is looked up again, then bisected."""
    rows = [keyed(f"k{i}", args=[i]) for i in range(6)] + [keyed("k1", args=[1])]
    rows[3]["task"] = None
    outcomes = asyncio.run(_submit_concurrently(db, rows))
    assert isinstance(outcomes[3], errors.JobNotStorable), outcomes
    good = [o for i, o in enumerate(outcomes) if i != 3]
    assert all(isinstance(o, Submitted) for o in good), outcomes
    assert [o.replayed for o in good] == [False] * 5 + [True]
    assert good[-1].row["id"] == good[1].row["id"]
    assert stored(db) == sorted(o.row["id"] for o in good[:5])


@pytest.mark.parametrize("database", DATABASES)
def test_one_key_sent_to_two_replicas_at_once_is_one_job(spawner: Spawner, database: str) -> None:
    replicas = spawner.replicas(spawner.backend(database, "sql"), 2)
    queue = f"q_{uuid.uuid4().hex[:8]}"
    body = {"task": "tests.across", "queue": queue}
    rounds, senders = 5, 12

    def post(sender: int, key: str, start: threading.Barrier) -> tuple[int, str]:
        with Api(replicas[sender % 2].url) as client:
            start.wait(timeout=30)
            response = client.http.post("/jobs", json=body, headers={"Idempotency-Key": key})
            return response.status_code, response.json().get("id", response.text)

    with ThreadPoolExecutor(senders) as pool:
        for _ in range(rounds):  # a few rounds: each is one chance for the groups to race
            key, start = f"across-{uuid.uuid4()}", threading.Barrier(senders)
            answers = list(pool.map(partial(post, key=key, start=start), range(senders)))
            assert sorted(status for status, _ in answers) == [200] * (senders - 1) + [202]
            assert len({job_id for _, job_id in answers}) == 1, answers
    assert spawner.api(replicas[0].url).queue_counts(queue) == {"queued": rounds}


def test_keys_the_database_holds_equal_are_one_key(db: Database) -> None:
    """MariaDB compares "pad" and "pad " equal (PAD SPACE), so its unique index does too:
    the second is a replay there, a job of its own elsewhere, and never a 500."""
    rows = [keyed("pad", args=[1]), keyed("pad ", args=[1])]
    first, second = asyncio.run(_submit_concurrently(db, rows))
    assert isinstance(first, Submitted) and isinstance(second, Submitted), (first, second)
    assert not first.replayed
    lenient = db.engine.dialect.name in ("mysql", "mariadb")
    assert second.replayed is lenient
    assert (second.row["id"] == first.row["id"]) is lenient
    later = db.run_sync(lambda session: store_group(session, [keyed("pad ", args=[1])], TTL))
    assert later == [Submitted(second.row, replayed=True)]
