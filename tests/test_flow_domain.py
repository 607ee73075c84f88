"""Issue 15: the claim under flow control (service/flow.py), driven directly on migrated
databases: max_running and rate per key, patterns, queue limits and pause, slots freed by
settle and by reclaim only, round-robin between keys."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import migrated_database, selected_databases

from service import flow
from service.db import Database
from service.effects import Effects
from service.jobs import Defaults, insert_jobs, new_job
from service.leases import LeaseTerms, Settle, new_token, reclaim_expired_leases, settle
from service.models import JobValues
from service.schemas import JobSubmit, LimitSpec, QueuePatch
from service.states import Outcome

DATABASES = ["sqlite", *(d for d in selected_databases() if d != "sqlite")]
QUEUE = "q_flow"


@pytest.fixture(params=DATABASES)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    with migrated_database(str(request.param), tmp_path) as database:
        yield database


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def submit(db: Database, now: datetime, count: int = 1, **spec: Any) -> list[str]:
    rows = [
        new_job(
            JobSubmit.model_validate({"task": "t", "queue": QUEUE, **spec}),
            now,
            Defaults(max_retries=3),
        )
        for _ in range(count)
    ]
    db.run_sync(lambda session: insert_jobs(session, rows))
    return [row["id"] for row in rows]


def lease(db: Database, now: datetime, want: int, lease_seconds: float = 30) -> list[JobValues]:
    terms = LeaseTerms("w", new_token(), now, lease_seconds, lease_seconds)
    return db.run_sync(lambda s: flow.claim_from_queues(s, [QUEUE], want, terms))


def put(db: Database, name: str, now: datetime, **spec: Any) -> None:
    db.run_sync(lambda s: flow.put_limit(s, name, LimitSpec.model_validate(spec), now))


def complete(db: Database, rows: list[JobValues], now: datetime) -> None:
    reports = [Settle(r["id"], r["lease_token"] or "", Outcome.succeeded) for r in rows]
    db.run_sync(lambda s: settle(s, reports, now, Effects()))


def test_max_running_per_key_and_slots_free_on_settle(db: Database, now: datetime) -> None:
    put(db, "cust-*", now, max_running=2)
    submit(db, now, 5, limits=["cust-a"])
    first = lease(db, now, 10)
    assert len(first) == 2
    assert lease(db, now, 10) == []  # full: nothing more, the rest stay queued
    complete(db, first[:1], now)
    assert len(lease(db, now, 10)) == 1


def test_a_dead_lease_holds_its_slot_until_reclaimed(db: Database, now: datetime) -> None:
    put(db, "solo", now, max_running=1)
    submit(db, now, 2, limits=["solo"])
    [_held] = lease(db, now, 5, lease_seconds=5)
    later = now + timedelta(seconds=3)
    assert lease(db, later, 5) == []  # its worker died, but the lease still runs
    after = now + timedelta(seconds=6)
    db.run_sync(lambda s: reclaim_expired_leases(s, after, Effects()))
    assert len(lease(db, after, 5)) == 1


def test_rate_is_a_sliding_window(db: Database, now: datetime) -> None:
    put(db, "api", now, rate={"limit": 3, "period": 10})
    submit(db, now, 8, limits=["api"])
    granted = lease(db, now, 8)
    assert len(granted) == 3
    complete(db, granted, now)
    assert lease(db, now + timedelta(seconds=9), 8) == []  # within the window still
    assert len(lease(db, now + timedelta(seconds=11), 8)) == 3


def test_a_full_key_does_not_block_other_keys(db: Database, now: datetime) -> None:
    put(db, "k-*", now, max_running=1)
    submit(db, now, 30, limits=["k-busy"])
    other = submit(db, now, 3, limits=["k-other"])
    submit(db, now, 2)  # no limits
    first = lease(db, now, 3)
    assert {r["limit_key"] for r in first} == {"k-busy", "k-other", None}
    more = lease(db, now, 10)
    assert len(more) == 1 and more[0]["limit_key"] is None  # both keys are full
    assert other[0] in {r["id"] for r in first}


def test_round_robin_between_keys(db: Database, now: datetime) -> None:
    submit(db, now, 6, limits=["rr-a"])
    submit(db, now, 2, limits=["rr-b"])
    # Within the window, one job of each key in turn, not the oldest first.
    assert [r["limit_key"] for r in lease(db, now, 4)] == ["rr-a", "rr-b", "rr-a", "rr-b"]


def test_a_key_that_fills_up_is_passed_by_in_the_same_claim(db: Database, now: datetime) -> None:
    put(db, "big", now, max_running=4)
    submit(db, now, 50, limits=["big"])
    small = submit(db, now, 2, limits=["small"])
    got = lease(db, now, 8)  # the first look fills "big", the next finds "small"
    assert sorted(r["limit_key"] for r in got) == ["big"] * 4 + ["small"] * 2
    assert set(small) <= {r["id"] for r in got}


def test_queue_limits_and_pause(db: Database, now: datetime) -> None:
    submit(db, now, 5)
    db.run_sync(lambda s: flow.patch_queue(s, QUEUE, QueuePatch(max_running=2), now))
    assert len(lease(db, now, 5)) == 2
    assert lease(db, now, 5) == []
    db.run_sync(lambda s: flow.patch_queue(s, QUEUE, QueuePatch(max_running=None), now))
    db.run_sync(lambda s: flow.patch_queue(s, QUEUE, QueuePatch(paused=True), now))
    assert lease(db, now, 5) == []
    db.run_sync(lambda s: flow.patch_queue(s, QUEUE, QueuePatch(paused=False), now))
    assert len(lease(db, now, 5)) == 3


def test_every_key_of_a_job_must_have_room(db: Database, now: datetime) -> None:
    put(db, "shared", now, max_running=1)
    submit(db, now, 1, limits=["x-1", "shared"])
    submit(db, now, 1, limits=["x-2", "shared"])
    assert len(lease(db, now, 5)) == 1
    assert lease(db, now, 5) == []


def test_a_queue_without_limits_takes_the_plain_claim_and_still_honours_limits(
    db: Database, now: datetime
) -> None:
    """Flow control configured elsewhere: a queue whose jobs name no limits is claimed by
    the plain one-statement claim (after one flow look found nothing limited); jobs with
    limits submitted to it later are still granted only while their key has room."""
    put(db, "other-*", now, max_running=1)
    submit(db, now, 3)
    assert len(lease(db, now, 2)) == 2  # a flow look: nothing limited in the window
    assert len(lease(db, now, 2)) == 1  # the plain claim, short: a flow look after it
    limited = set(submit(db, now, 3, limits=["other-x"]))
    unlimited = set(submit(db, now, 2))
    granted = {row["id"] for row in lease(db, now, 10)}
    assert unlimited <= granted
    assert len(granted & limited) == 1  # max_running 1
    assert lease(db, now, 10) == []
