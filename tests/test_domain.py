"""The lease domain in process, in seconds: settle (complete, fail, release, fencing),
backoff, heartbeats, the reclaim of expired leases, expiry and cancel, called directly
on a real database built by migrating (SQLite always; PostgreSQL and MariaDB when the
selected matrix uses them). No service process, no broker, no sleeping: every call is
given its own ``now``, so a lease "expires" because the test says when it is.

Jobs are stored by the submit path's own ``new_job``; leases are granted by ``grant``
below, the one place that knows how the domain grants them."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import migrated_database, selected_databases

from service import errors
from service.db import Database
from service.jobs import Defaults, cancel_job, insert_jobs, new_job
from service.leases import (
    Effects,
    LeaseTerms,
    Scope,
    Settle,
    SettleOutcome,
    backoff,
    expire_pending,
    heartbeat,
    promote_due,
    reclaim_expired_leases,
    settle,
)
from service.models import JOBS_TABLE
from service.schemas import JobSubmit

DATABASES = ["sqlite", *(d for d in selected_databases() if d != "sqlite")]
QUEUE = "q_domain"
LEASE_SECONDS = 30.0


@pytest.fixture(params=DATABASES)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    with migrated_database(str(request.param), tmp_path) as database:
        yield database


@pytest.fixture
def now() -> datetime:
    """Whole seconds: MariaDB's DATETIME keeps no fraction, and times are compared exactly."""
    return datetime.now(UTC).replace(microsecond=0)


# --- helpers: store, lease, read and report on jobs the way the service does -----------------


def submit(db: Database, now: datetime, **spec: Any) -> str:
    """Store a job as POST /jobs would; returns its id."""
    row = new_job(JobSubmit.model_validate({"task": "tests.noop", "queue": QUEUE, **spec}), now,
                  Defaults(max_retries=3))  # fmt: skip
    db.run_sync(lambda session: insert_jobs(session, [row]))
    return str(row["id"])


def grant(db: Database, job_id: str, now: datetime, worker: str = "w1") -> str | None:
    """Lease the job to ``worker`` for LEASE_SECONDS; its token, or None when the job was
    not granted. The one helper to adapt when the grant path changes shape."""
    # Imported here: if the grant path moves, only the tests that lease fail to run.
    from service.leases import claim_by_ids, new_token

    token = new_token()
    terms = LeaseTerms(worker, token, now, LEASE_SECONDS, LEASE_SECONDS)
    granted = db.run_sync(lambda session: claim_by_ids(session, [job_id], terms))
    return token if granted else None


def leased(db: Database, now: datetime, **spec: Any) -> tuple[str, str]:
    """A job submitted and leased at ``now``: (id, token)."""
    job_id = submit(db, now, **spec)
    token = grant(db, job_id, now)
    assert token is not None, f"job {job_id} was not granted"
    return job_id, token


def row(db: Database, job_id: str) -> dict[str, Any]:
    query = sa.select(JOBS_TABLE).where(JOBS_TABLE.c.id == job_id)
    found = db.run_sync(lambda session: session.execute(query).one())
    return dict(found._mapping)


def report(
    db: Database, job_id: str, token: str, outcome: str, now: datetime, **details: Any
) -> tuple[SettleOutcome, Effects]:
    """One worker report (succeeded | failed | released) settled in its own transaction."""
    effects = Effects()
    settled = Settle(job_id, token, outcome, **details)
    [answer] = db.run_sync(lambda session: settle(session, [settled], now, effects))
    return answer, effects


def sweep(
    db: Database,
    transition: Callable[[Any, datetime, Effects, Scope], int],
    now: datetime,
    *job_ids: str,
) -> Effects:
    """Run one maintenance transition at ``now`` over these jobs only."""
    effects = Effects()
    db.run_sync(lambda session: transition(session, now, effects, Scope(only=job_ids)))
    return effects


def dispatched(effects: Effects) -> list[str]:
    return [d.id for d in effects.dispatch]


BOOM = {"type": "Boom", "message": "it broke"}


# --- settle ---------------------------------------------------------------------------------


def test_complete_with_the_right_token_succeeds(db: Database, now: datetime) -> None:
    job_id, token = leased(db, now)
    done = now + timedelta(seconds=3)
    answer, effects = report(db, job_id, token, "succeeded", done, result={"n": 42})
    assert (answer.problem, answer.status) == (None, "succeeded")
    job = row(db, job_id)
    assert job["status"] == "succeeded" and job["result"] == {"n": 42} and job["error"] is None
    assert job["finished_at"] == done and job["started_at"] == now and job["attempt"] == 1
    assert job["lease_token"] is None and job["lease_expires_at"] is None
    assert effects.finished == [job_id] and not effects.dispatch


def test_a_stale_token_changes_nothing(db: Database, now: datetime) -> None:
    job_id, token = leased(db, now)
    before = row(db, job_id)
    for outcome in ("succeeded", "failed", "released"):
        answer, effects = report(db, job_id, "not-" + token, outcome, now, error=BOOM)
        assert answer.problem == "stale-lease", (outcome, answer)
        assert effects == Effects(), outcome
    assert row(db, job_id) == before
    # A settled lease is over: its own token is now stale too, and changes nothing.
    assert report(db, job_id, token, "succeeded", now)[0].problem is None
    after = row(db, job_id)
    answer, _ = report(db, job_id, token, "failed", now + timedelta(seconds=1), error=BOOM)
    assert answer.problem == "stale-lease" and row(db, job_id) == after


def test_a_token_reported_by_another_api_key_is_stale(db: Database, now: datetime) -> None:
    job_id, token = leased(db, now)  # granted with no key ("": auth off)
    before = row(db, job_id)
    settled = Settle(job_id, token, "succeeded")
    [answer] = db.run_sync(lambda s: settle(s, [settled], now, Effects(), key_id="other"))
    assert answer.problem == "stale-lease" and row(db, job_id) == before


def test_an_unknown_job_is_not_found(db: Database, now: datetime) -> None:
    answer, effects = report(db, "0" * 32, "token", "succeeded", now)
    assert answer.problem == "not-found" and effects == Effects()


def test_a_failure_with_retries_left_is_retried_after_its_backoff(
    db: Database, now: datetime
) -> None:
    backoff_spec = {"base": 2.0, "max": 60.0, "jitter": False}
    job_id, token = leased(db, now, max_retries=2, retry_backoff=backoff_spec)
    answer, effects = report(db, job_id, token, "failed", now, error=BOOM)
    assert (answer.problem, answer.status) == (None, "retrying")
    job = row(db, job_id)
    assert job["status"] == "retrying" and job["error"] == BOOM and job["attempt"] == 1
    assert job["run_at"] == now + timedelta(seconds=2)  # base x 2^(attempt-1)
    assert job["finished_at"] is None and job["lease_token"] is None
    assert effects.earliest_due == job["run_at"] and not effects.finished


def test_the_worker_may_choose_when_to_retry(db: Database, now: datetime) -> None:
    job_id, token = leased(db, now, max_retries=1)
    report(db, job_id, token, "failed", now, error=BOOM, retry_in=17.0)
    assert row(db, job_id)["run_at"] == now + timedelta(seconds=17)


@pytest.mark.parametrize(
    ("spec", "details"),
    [({"max_retries": 0}, {}), ({"max_retries": 5}, {"retry": False})],
    ids=["no-retries-left", "worker-says-do-not-retry"],
)
def test_a_failure_without_a_retry_is_final(
    db: Database, now: datetime, spec: dict[str, Any], details: dict[str, Any]
) -> None:
    job_id, token = leased(db, now, **spec)
    answer, effects = report(db, job_id, token, "failed", now, error=BOOM, **details)
    assert (answer.problem, answer.status) == (None, "failed")
    job = row(db, job_id)
    assert job["status"] == "failed" and job["error"] == BOOM and job["finished_at"] == now
    assert job["attempt"] == 1 and job["lease_token"] is None
    assert effects.finished == [job_id] and effects.earliest_due is None


def test_the_last_attempt_fails_for_good(db: Database, now: datetime) -> None:
    """max_retries=1: two attempts in all; the second failure is final."""
    job_id, token = leased(db, now, max_retries=1)
    assert report(db, job_id, token, "failed", now, error=BOOM, retry_in=0.0)[0].status == (
        "retrying"
    )
    assert dispatched(sweep(db, promote_due, now, job_id)) == [job_id]
    second = grant(db, job_id, now)
    assert second is not None and row(db, job_id)["attempt"] == 2
    assert report(db, job_id, second, "failed", now, error=BOOM)[0].status == "failed"


def test_a_release_requeues_without_counting_the_attempt(db: Database, now: datetime) -> None:
    job_id, token = leased(db, now, max_retries=0)
    answer, effects = report(db, job_id, token, "released", now)
    assert (answer.problem, answer.status) == (None, "queued")
    job = row(db, job_id)
    assert job["status"] == "queued" and job["attempt"] == 0 and job["lease_token"] is None
    assert dispatched(effects) == [job_id] and not effects.finished
    # It never ran, so even a job with no retries runs again, as its first attempt.
    again = grant(db, job_id, now)
    assert again is not None and row(db, job_id)["attempt"] == 1


# --- backoff --------------------------------------------------------------------------------


def delay(attempt: int, base: float = 1.0, most: float = 300.0, jitter: bool = False) -> float:
    return backoff(
        {"attempt": attempt, "backoff_base": base, "backoff_max": most, "backoff_jitter": jitter}
    )


def test_backoff_doubles_from_its_base_up_to_its_max() -> None:
    assert [delay(n, base=1.5) for n in (1, 2, 3, 4)] == [1.5, 3.0, 6.0, 12.0]
    assert delay(0, base=1.5) == 1.5  # never below the base
    assert [delay(n, base=10, most=45) for n in (2, 3, 4, 40)] == [20, 40, 45, 45]
    assert delay(3, base=0) == 0


def test_jitter_stays_between_half_and_all_of_the_delay() -> None:
    random.seed(13)
    for attempt, full in ((1, 4.0), (3, 16.0), (9, 100.0)):
        samples = [delay(attempt, base=4, most=100, jitter=True) for _ in range(300)]
        assert all(full / 2 <= s <= full for s in samples), (attempt, min(samples), max(samples))
        # Spread over the range, not one value.
        assert min(samples) < full * 0.6 and max(samples) > full * 0.9, (attempt, samples[:5])


# --- heartbeats and the reclaim of expired leases -------------------------------------------


def beat(db: Database, job_id: str, token: str, now: datetime, progress: Any = None) -> Any:
    terms = LeaseTerms("w1", token, now, LEASE_SECONDS, LEASE_SECONDS)
    [outcome] = db.run_sync(lambda session: heartbeat(session, [(job_id, token, progress)], terms))
    return outcome


def test_a_heartbeat_extends_the_lease_and_a_stale_one_does_not(
    db: Database, now: datetime
) -> None:
    job_id, token = leased(db, now)
    later = now + timedelta(seconds=20)
    outcome = beat(db, job_id, token, later, progress={"done": 1})
    assert outcome.problem is None and outcome.cancel_requested is False
    job = row(db, job_id)
    assert (
        job["lease_expires_at"] == later + timedelta(seconds=LEASE_SECONDS) == (outcome.expires_at)
    )
    assert job["progress"] == {"done": 1}
    assert beat(db, job_id, "stale", later + timedelta(seconds=5)).problem == "stale-lease"
    assert row(db, job_id) == job
    # Extended: not reclaimed at the first deadline, only past the new one.
    first_deadline = now + timedelta(seconds=LEASE_SECONDS + 1)
    assert sweep(db, reclaim_expired_leases, first_deadline, job_id) == Effects()
    assert row(db, job_id)["status"] == "running"


def test_an_expired_lease_is_reclaimed_and_the_attempt_counts(db: Database, now: datetime) -> None:
    job_id, token = leased(db, now, max_retries=2)
    deadline = now + timedelta(seconds=LEASE_SECONDS)
    assert sweep(db, reclaim_expired_leases, deadline, job_id) == Effects()  # not yet over
    effects = sweep(db, reclaim_expired_leases, deadline + timedelta(seconds=1), job_id)
    job = row(db, job_id)
    assert job["status"] == "queued" and job["attempt"] == 1  # it ran (and maybe died)
    assert job["lease_token"] is None and job["lease_expires_at"] is None
    assert dispatched(effects) == [job_id] and not effects.finished
    # The next lease is the second attempt; the lost worker's token changes nothing.
    second = grant(db, job_id, deadline)
    assert second is not None and row(db, job_id)["attempt"] == 2
    before = row(db, job_id)
    assert report(db, job_id, token, "succeeded", deadline)[0].problem == "stale-lease"
    assert row(db, job_id) == before


def test_a_reclaim_with_no_attempts_left_fails_the_job(db: Database, now: datetime) -> None:
    """A job that kills its worker must not loop: the reclaim is its last attempt."""
    job_id, _token = leased(db, now, max_retries=0)
    over = now + timedelta(seconds=LEASE_SECONDS + 1)
    effects = sweep(db, reclaim_expired_leases, over, job_id)
    job = row(db, job_id)
    assert job["status"] == "failed" and job["finished_at"] == over and job["attempt"] == 1
    assert job["error"]["type"] == "LeaseExpired" and "w1" in job["error"]["message"]
    assert effects.finished == [job_id] and not effects.dispatch


def test_a_reclaimed_job_whose_cancel_was_requested_is_cancelled(
    db: Database, now: datetime
) -> None:
    job_id, _token = leased(db, now, max_retries=5)
    db.run_sync(lambda session: cancel_job(session, job_id, now))
    over = now + timedelta(seconds=LEASE_SECONDS + 1)
    effects = sweep(db, reclaim_expired_leases, over, job_id)
    job = row(db, job_id)
    assert job["status"] == "cancelled" and job["finished_at"] == over
    assert effects.finished == [job_id] and not effects.dispatch


# --- expiry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("delay_seconds", [None, 60.0], ids=["queued", "scheduled"])
def test_a_pending_job_past_its_expiry_expires_and_never_starts(
    db: Database, now: datetime, delay_seconds: float | None
) -> None:
    expires = now + timedelta(seconds=10)
    job_id = submit(db, now, expires_at=expires, delay=delay_seconds)
    assert sweep(db, expire_pending, expires - timedelta(seconds=1), job_id) == Effects()
    assert row(db, job_id)["status"] == ("queued" if delay_seconds is None else "scheduled")
    effects = sweep(db, expire_pending, expires, job_id)
    job = row(db, job_id)
    assert job["status"] == "expired" and job["finished_at"] == expires
    assert effects.finished == [job_id]
    assert grant(db, job_id, expires) is None
    assert job["started_at"] is None and job["attempt"] == 0 and row(db, job_id) == job


def test_a_queued_job_past_its_expiry_is_not_granted(db: Database, now: datetime) -> None:
    """Between the expiry and the sweep that records it, no worker may start the job."""
    expires = now + timedelta(seconds=10)
    job_id = submit(db, now, expires_at=expires)
    assert grant(db, job_id, expires + timedelta(seconds=1)) is None
    assert row(db, job_id)["status"] == "queued" and row(db, job_id)["attempt"] == 0


def test_a_running_job_does_not_expire(db: Database, now: datetime) -> None:
    """Expiry means "never start after this"; a job already started runs to its end."""
    job_id, token = leased(db, now, expires_at=now + timedelta(seconds=10))
    assert sweep(db, expire_pending, now + timedelta(seconds=11), job_id) == Effects()
    assert row(db, job_id)["status"] == "running"
    assert report(db, job_id, token, "succeeded", now)[0].status == "succeeded"


# --- cancel ---------------------------------------------------------------------------------


def test_cancelling_a_queued_job_finishes_it(db: Database, now: datetime) -> None:
    job_id = submit(db, now)
    db.run_sync(lambda session: cancel_job(session, job_id, now, Effects()))
    job = row(db, job_id)
    assert job["status"] == "cancelled" and job["finished_at"] == now
    assert not job["cancel_requested"]
    assert grant(db, job_id, now) is None
    with pytest.raises(errors.JobFinished):
        db.run_sync(lambda session: cancel_job(session, job_id, now))


def test_cancelling_a_running_job_asks_its_worker(db: Database, now: datetime) -> None:
    job_id, token = leased(db, now, max_retries=5)
    db.run_sync(lambda session: cancel_job(session, job_id, now, Effects()))
    job = row(db, job_id)
    assert job["status"] == "running" and job["cancel_requested"]
    assert job["lease_token"] == token and job["finished_at"] is None
    assert beat(db, job_id, token, now).cancel_requested is True  # heard at its heartbeat
    # The worker stops and reports a failure: cancelled, not retried.
    answer, effects = report(db, job_id, token, "failed", now, error=BOOM)
    assert answer.status == "cancelled" and row(db, job_id)["status"] == "cancelled"
    assert effects.finished == [job_id] and effects.earliest_due is None


# --- claims: claimed and granted in one statement where the database allows (issue 14) ------


def claim(
    db: Database, now: datetime, max_jobs: int, lease_seconds: float | None = None
) -> list[Any]:
    from service.leases import claim_from_queues, new_token

    terms = LeaseTerms("w1", new_token(), now, lease_seconds, LEASE_SECONDS)
    return db.run_sync(lambda session: claim_from_queues(session, [QUEUE], max_jobs, terms))


def test_a_claim_takes_max_jobs_at_most_highest_priority_then_oldest(
    db: Database, now: datetime
) -> None:
    ids = [submit(db, now, priority=priority) for priority in (0, 9, 0, 9, 5)]
    first = claim(db, now, 1)
    assert [job["id"] for job in first] == [ids[1]]
    assert first[0]["attempt"] == 1 and row(db, ids[1])["lease_token"] == first[0]["lease_token"]
    assert [job["id"] for job in claim(db, now, 3)] == [ids[3], ids[4], ids[0]]
    assert row(db, ids[2])["status"] == "queued"


def test_a_lease_lasts_the_requested_length_else_the_job_timeout_else_the_default(
    db: Database, now: datetime
) -> None:
    own, plain = submit(db, now, timeout=7.5), submit(db, now)
    granted = {job["id"]: job["lease_expires_at"] for job in claim(db, now, 5)}
    assert granted == {own: now + timedelta(seconds=7.5), plain: now + timedelta(seconds=30)}
    assert row(db, own)["lease_expires_at"] == granted[own]
    fixed = submit(db, now, timeout=7.5)
    [job] = claim(db, now, 5, lease_seconds=12.0)
    assert job["id"] == fixed and job["lease_expires_at"] == now + timedelta(seconds=12)
