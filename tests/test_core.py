"""The job lifecycle and the worker protocol against real services, over the whole
backend matrix (see conftest.py). Every test works in queues of its own."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from conftest import FINISHED, Api, Backend, Service, Spawner, assert_problem, expect

pytestmark = pytest.mark.timeout(90)


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def rfc3339(moment: datetime) -> str:
    return moment.isoformat()


def now() -> datetime:
    return datetime.now(UTC)


# --- the basic lifecycle ----------------------------------------------------------------


def test_submit_lease_complete_result(api: Api, queue: str) -> None:
    spec = {
        "task": "tests.add",
        "args": [1, 2.5, "x", None, {"deep": [True]}],
        "kwargs": {"k": "v", "n": 7},
        "queue": queue,
        "priority": 3,
        "max_retries": 1,
        "retry_backoff": {"base": 0.1, "max": 2.5, "jitter": False},
        "timeout": 5,
    }
    submitted = api.submit(**spec)
    assert submitted["status"] == "queued"
    assert submitted["attempt"] == 0
    for key in ("task", "args", "kwargs", "queue", "priority", "max_retries", "retry_backoff"):
        assert submitted[key] == spec[key], key
    assert submitted["timeout"] == 5
    assert submitted["result"] is None and submitted["error"] is None
    assert submitted["started_at"] is None and submitted["finished_at"] is None
    assert submitted["cancel_requested"] is False and submitted["worker"] is None
    uuid.UUID(submitted["id"])
    assert submitted["id"][14] == "7", "ids are UUIDv7"

    # What SQL stored reads back exactly as submitted (floats, JSON, timestamps).
    assert api.get(submitted["id"]) == submitted

    before = now()
    leased = api.lease_one(queue, worker="worker-a")
    assert leased["id"] == submitted["id"]
    assert leased["task"] == "tests.add"
    assert leased["args"] == spec["args"] and leased["kwargs"] == spec["kwargs"]
    assert leased["queue"] == queue and leased["priority"] == 3
    assert leased["attempt"] == 1 and leased["max_retries"] == 1
    assert leased["lease"]["token"]
    # The job's timeout is its lease length.
    lease_left = (ts(leased["lease"]["expires_at"]) - before).total_seconds()
    assert 4 < lease_left < 7, lease_left

    running = api.get(submitted["id"])
    assert running["status"] == "running"
    assert running["worker"] == "worker-a"
    assert running["attempt"] == 1
    assert running["started_at"] is not None

    result = {"sum": 3.5, "list": [1, None, "é"], "nested": {"a": {"b": []}}}
    done = expect(api.complete(leased, result), 200)
    assert done["status"] == "succeeded"
    assert done["result"] == result

    stored = api.get(submitted["id"])
    assert stored["status"] == "succeeded"
    assert stored["result"] == result
    assert stored["error"] is None
    assert stored["finished_at"] is not None
    assert ts(stored["finished_at"]) >= ts(stored["started_at"]) >= ts(stored["created_at"])

    # The lease is settled: its token is stale now and changes nothing.
    assert_problem(api.complete(leased, "again"), 409, "stale-lease")
    assert_problem(api.heartbeat(leased), 409, "stale-lease")
    assert api.get(submitted["id"])["result"] == result


def test_batch_keeps_order(api: Api, queue: str) -> None:
    specs = [
        {"task": f"tests.t{i}", "queue": queue, "args": [i], "priority": i % 3} for i in range(7)
    ]
    jobs = api.submit_batch(specs)
    assert [job["task"] for job in jobs] == [spec["task"] for spec in specs]
    assert [job["args"] for job in jobs] == [[i] for i in range(7)]
    assert all(job["status"] == "queued" for job in jobs)
    ids = [job["id"] for job in jobs]
    assert ids == sorted(ids), "batch ids are time-ordered in submission order"
    assert len(set(ids)) == 7
    for job in jobs:
        assert api.get(job["id"]) == job
    assert api.queue_counts(queue) == {"queued": 7}


@pytest.mark.parametrize(
    "bad_job",
    [
        pytest.param({"delay": 5, "run_at": "2030-01-01T00:00:00Z"}, id="delay-and-run_at"),
        pytest.param({"priority": 10}, id="priority-out-of-range"),
        pytest.param({"task": "bad name!"}, id="bad-task-name"),
        pytest.param({"surprise": 1}, id="unknown-field"),
    ],
)
def test_batch_is_all_or_nothing(api: Api, queue: str, bad_job: dict[str, Any]) -> None:
    jobs = [{"task": "tests.ok", "queue": queue} for _ in range(3)]
    jobs.insert(2, {"task": "tests.bad", "queue": queue, **bad_job})
    response = api.http.post("/jobs/batch", json={"jobs": jobs})
    problem = assert_problem(response, 422)
    if "delay" in bad_job:
        assert "jobs[2]" in problem["detail"]
    assert api.list_jobs(queue=queue)["jobs"] == []
    assert api.queue_counts(queue) == {}
    assert api.lease(queue, max_jobs=10) == []


# --- waiting for results ------------------------------------------------------------------


def test_get_wait_returns_when_the_job_finishes(api: Api, service: Service, queue: str) -> None:
    job = api.submit(queue=queue)
    leased = api.lease_one(queue)

    def completer() -> None:
        with Api(service.url) as other:
            expect(other.complete(leased, "finished"), 200)

    # Complete from another thread a moment after the long-poll is parked.
    timer = threading.Timer(0.4, completer)
    timer.start()
    try:
        started = time.monotonic()
        answer = api.get(job["id"], wait=20)
        elapsed = time.monotonic() - started
    finally:
        timer.join()
    assert answer["status"] == "succeeded"
    assert answer["result"] == "finished"
    assert 0.3 < elapsed < 5, f"the wait did not end on the finish event: {elapsed:.2f}s"


def test_get_wait_returns_a_finished_job_at_once(api: Api, queue: str) -> None:
    job = api.submit(queue=queue)
    expect(api.complete(api.lease_one(queue), 1), 200)
    started = time.monotonic()
    assert api.get(job["id"], wait=20)["status"] == "succeeded"
    assert time.monotonic() - started < 3


def test_get_wait_returns_the_unfinished_job_after_the_wait(api: Api, queue: str) -> None:
    job = api.submit(queue=queue)
    started = time.monotonic()
    answer = api.get(job["id"], wait=0.6)
    elapsed = time.monotonic() - started
    assert answer["status"] == "queued"
    assert answer["id"] == job["id"]
    assert 0.55 <= elapsed < 5, elapsed


# --- leases: fencing, release, heartbeats, reports ----------------------------------------


def test_fencing_a_reclaimed_lease_is_stale(api: Api, queue: str) -> None:
    job = api.submit(queue=queue, max_retries=3)
    a = api.lease_one(queue, worker="worker-a", lease_seconds=1)
    assert a["attempt"] == 1
    # Worker A stops heartbeating. B long-polls: the maintenance loop reclaims the expired
    # lease and queues the job again, which wakes B's lease.
    started = time.monotonic()
    b = api.lease_one(queue, wait=10, worker="worker-b")
    waited = time.monotonic() - started
    assert b["id"] == job["id"]
    assert b["attempt"] == 2
    assert b["lease"]["token"] != a["lease"]["token"]
    assert 0.5 < waited < 6, waited
    assert api.get(job["id"])["worker"] == "worker-b"

    # A wakes up and reports: all of it is refused and changes nothing.
    assert_problem(api.complete(a, "from A"), 409, "stale-lease")
    assert_problem(api.fail(a), 409, "stale-lease")
    assert_problem(api.release(a), 409, "stale-lease")
    assert_problem(api.heartbeat(a), 409, "stale-lease")
    current = api.get(job["id"])
    assert current["status"] == "running" and current["worker"] == "worker-b"

    expect(api.complete(b, "from B"), 200)
    assert_problem(api.complete(a, "from A"), 409, "stale-lease")
    final = api.get(job["id"])
    assert final["status"] == "succeeded"
    assert final["result"] == "from B"
    assert final["attempt"] == 2


# Each database once and each broker once: the kill and the heartbeat behave alike on the
# other pairs, and 5 s a backend was the suite's time budget.
ONE_OF_EACH = pytest.mark.only_backends(
    "sqlite-sql", "postgres-redis", "postgres-amqp", "mariadb-sql"
)


@ONE_OF_EACH
def test_heartbeat_extends_the_lease(api: Api, queue: str) -> None:
    job = api.submit(queue=queue)
    leased = api.lease_one(queue, lease_seconds=1.5)
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:  # keep the 1.5 s lease alive past its first expiry
        answer = expect(api.heartbeat(leased, progress={"done": 1}, lease_seconds=1.5), 200)
        assert answer["lease"]["token"] == leased["lease"]["token"]
        assert answer["cancel_requested"] is False
        left = (ts(answer["lease"]["expires_at"]) - now()).total_seconds()
        assert 0.5 < left <= 1.6, left
        assert api.lease(queue) == [], "a heartbeated lease must not be reclaimed"
        time.sleep(0.3)  # a worker's heartbeat period
    assert api.get(job["id"])["progress"] == {"done": 1}
    expect(api.complete(leased, "kept"), 200)
    assert api.get(job["id"])["attempt"] == 1


def test_release_does_not_count_an_attempt(api: Api, queue: str) -> None:
    job = api.submit(queue=queue, max_retries=0)
    for _ in range(3):
        leased = api.lease_one(queue)
        assert leased["attempt"] == 1
        released = expect(api.release(leased), 200)
        assert released["status"] == "queued"
        assert released["attempt"] == 0
        assert_problem(api.release(leased), 409, "stale-lease")
    leased = api.lease_one(queue)
    assert leased["attempt"] == 1
    expect(api.complete(leased, "ok"), 200)
    assert api.get(job["id"])["attempt"] == 1


def test_batch_heartbeat(api: Api, queue: str) -> None:
    jobs = api.submit_batch([{"queue": queue, "task": "tests.hb"} for _ in range(3)])
    leased = api.lease(queue, max_jobs=3, wait=5, lease_seconds=5)
    assert sorted(job["id"] for job in leased) == sorted(job["id"] for job in jobs)
    first, second, third = leased
    expect(api.complete(third, None), 200)  # its token is stale from now on
    unknown = str(uuid.uuid4())
    body = {
        "leases": [
            {"id": first["id"], "token": first["lease"]["token"], "progress": {"pct": 10}},
            {"id": second["id"], "token": second["lease"]["token"]},
            {"id": third["id"], "token": third["lease"]["token"]},
            {"id": second["id"], "token": "not-the-token"},
            {"id": unknown, "token": "whatever"},
        ],
        "lease_seconds": 30,
    }
    answer = expect(api.http.post("/leases/heartbeat", json=body), 200)["leases"]
    assert [item["id"] for item in answer] == [
        first["id"],
        second["id"],
        third["id"],
        second["id"],
        unknown,
    ]
    assert [item["ok"] for item in answer] == [True, True, False, False, False]
    for item in answer[:2]:
        left = (ts(item["expires_at"]) - now()).total_seconds()
        assert 25 < left <= 31, left
        assert item["cancel_requested"] is False
        assert item["detail"] is None
    assert answer[2]["detail"] == "stale-lease"
    assert answer[3]["detail"] == "stale-lease"
    assert answer[4]["detail"] == "not-found"
    assert api.get(first["id"])["progress"] == {"pct": 10}
    assert api.get(second["id"])["progress"] is None


def test_batch_report_mixed_outcomes(api: Api, queue: str) -> None:
    api.submit_batch([{"queue": queue, "task": "tests.rep", "max_retries": 5} for _ in range(5)])
    a, b, c, d, e = api.lease(queue, max_jobs=5, wait=5)
    expect(api.complete(e, "early"), 200)
    error = {"type": "ValueError", "message": "bad input", "traceback": "Traceback..."}
    body = {
        "reports": [
            {"id": a["id"], "token": a["lease"]["token"], "outcome": "succeeded", "result": [1]},
            {
                "id": b["id"],
                "token": b["lease"]["token"],
                "outcome": "failed",
                "error": error,
                "retry": False,
            },
            {"id": c["id"], "token": c["lease"]["token"], "outcome": "released"},
            {
                "id": d["id"],
                "token": d["lease"]["token"],
                "outcome": "failed",
                "error": error,
                "retry_in": 30,
            },
            {"id": e["id"], "token": e["lease"]["token"], "outcome": "succeeded", "result": 2},
        ]
    }
    answer = expect(api.http.post("/leases/report", json=body), 200)["reports"]
    assert [(r["id"], r["ok"], r["status"]) for r in answer] == [
        (a["id"], True, "succeeded"),
        (b["id"], True, "failed"),
        (c["id"], True, "queued"),
        (d["id"], True, "retrying"),
        (e["id"], False, None),
    ]
    assert answer[4]["detail"] == "stale-lease"

    assert api.get(a["id"])["result"] == [1]
    failed = api.get(b["id"])
    assert failed["status"] == "failed"
    assert failed["error"] == error
    assert api.get(c["id"])["attempt"] == 0
    retrying = api.get(d["id"])
    assert retrying["status"] == "retrying"
    assert (ts(retrying["run_at"]) - now()).total_seconds() > 20
    assert api.get(e["id"])["result"] == "early"  # the stale report changed nothing
    # The released job is offered again.
    assert api.lease_one(queue)["id"] == c["id"]
    # A job waiting to retry can be cancelled; it never runs again.
    assert expect(api.cancel(d["id"]), 200)["status"] == "cancelled"
    assert_problem(api.retry(a["id"]), 409, "job-not-retryable")


def settle_all(api: Api, leased: list[dict[str, Any]]) -> None:
    """Report leased jobs succeeded, so their leases do not expire (and get reclaimed in
    a burst) while later tests run on the same service."""
    for start in range(0, len(leased), 500):
        reports = [
            {"id": job["id"], "token": job["lease"]["token"], "outcome": "succeeded"}
            for job in leased[start : start + 500]
        ]
        api.http.post("/leases/report", json={"reports": reports})


def test_concurrent_leases_never_share_a_job(api: Api, service: Service, queue: str) -> None:
    ids = {job["id"] for job in api.submit_batch([{"queue": queue} for _ in range(120)])}

    def worker(name: str) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        with Api(service.url) as client:
            while True:
                leased = client.lease(queue, max_jobs=7, wait=0.3, worker=name, lease_seconds=60)
                if not leased:
                    return got
                got += leased

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(worker, [f"w{i}" for i in range(4)]))
    leased = [job for got in results for job in got]
    try:
        leased_ids = [job["id"] for job in leased]
        assert len(leased_ids) == len(set(leased_ids)), "a job was leased to two workers"
        assert set(leased_ids) == ids
        assert api.queue_counts(queue) == {"running": 120}
    finally:
        settle_all(api, leased)


def test_leasing_while_expired_leases_are_reclaimed(api: Api, service: Service, queue: str) -> None:
    """Grants and the maintenance loop's reclaim run at the same moment, on rows of the
    same table: neither may fail the other (a deadlock must not become a 500)."""
    expiring, busy = f"{queue}_expiring", f"{queue}_busy"
    stale = api.submit_batch([{"queue": expiring, "max_retries": 5} for _ in range(300)])
    held = api.lease(expiring, max_jobs=300, wait=5, lease_seconds=1)
    assert len(held) == 300
    ids = {job["id"] for job in api.submit_batch([{"queue": busy} for _ in range(300)])}

    everyone: list[dict[str, Any]] = []  # list.extend is atomic: a shared tally

    def worker(name: str) -> tuple[list[dict[str, Any]], list[str]]:
        got: list[dict[str, Any]] = []
        errors: list[str] = []
        deadline = time.monotonic() + 20
        body = {"worker": name, "queues": [busy], "max_jobs": 2, "wait": 1, "lease_seconds": 60}
        with Api(service.url) as client:
            while len(everyone) < len(ids) and time.monotonic() < deadline:
                try:
                    response = client.http.post("/leases", json=body)
                except httpx.TransportError as exc:  # the service dropped the request
                    errors.append(repr(exc))
                    continue
                if response.status_code != 200:
                    errors.append(f"{response.status_code} {response.text[:200]}")
                    continue
                got += response.json()["jobs"]
                everyone.extend(response.json()["jobs"])
                time.sleep(0.02)  # spread the grants across the reclaim
        return got, errors

    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(worker, [f"w{i}" for i in range(5)]))
    leased = [job for got, _ in results for job in got]
    try:
        failures = [error for _, errors in results for error in errors]
        assert failures == [], failures
        leased_ids = [job["id"] for job in leased]
        assert len(leased_ids) == len(set(leased_ids)) == 300
        assert set(leased_ids) == ids
        # Every expired lease was reclaimed: the jobs are queued again (attempt counted).
        reclaimed = api.wait_for(
            lambda: api.queue_counts(expiring) == {"queued": 300},
            timeout=15,
            what="the expired leases to be reclaimed",
        )
        assert reclaimed
        assert api.get(stale[0]["id"])["attempt"] == 1
    finally:
        settle_all(api, leased)


# --- retries ----------------------------------------------------------------------------


def test_retries_with_backoff_then_failed_then_manual_retry(api: Api, queue: str) -> None:
    job = api.submit(
        queue=queue,
        task="tests.flaky",
        max_retries=2,
        retry_backoff={"base": 0.1, "max": 10, "jitter": False},
    )
    for attempt, backoff in ((1, 0.1), (2, 0.2)):
        leased = api.lease_one(queue, wait=10)
        assert leased["attempt"] == attempt
        answer = expect(api.fail(leased, "IOError", f"attempt {attempt}"), 200)
        assert answer["status"] == "retrying"
        assert answer["error"]["type"] == "IOError"
        # Exponential, no jitter: due base * 2**(attempt-1) after the failure.
        due_after_start = (ts(answer["run_at"]) - ts(answer["started_at"])).total_seconds()
        assert backoff - 0.001 <= due_after_start < backoff + 2.0, due_after_start
    leased = api.lease_one(queue, wait=10)
    assert leased["attempt"] == 3
    final = expect(api.fail(leased, "IOError", "attempt 3"), 200)
    assert final["status"] == "failed"
    assert final["attempt"] == 3
    assert final["error"] == {"type": "IOError", "message": "attempt 3"}
    assert api.wait_finished(job["id"])["status"] == "failed"
    assert api.lease(queue) == []

    # A failed job can be queued again by hand, with a fresh retry budget.
    again = expect(api.retry(job["id"]), 200)
    assert again["status"] == "queued"
    assert again["attempt"] == 0
    assert again["error"] is None and again["finished_at"] is None
    leased = api.lease_one(queue)
    assert leased["attempt"] == 1
    expect(api.complete(leased, "third time lucky"), 200)
    assert api.get(job["id"])["status"] == "succeeded"
    assert_problem(api.retry(job["id"]), 409, "job-not-retryable")


def test_fail_without_retry_fails_at_once(api: Api, queue: str) -> None:
    job = api.submit(queue=queue, max_retries=5)
    answer = expect(api.fail(api.lease_one(queue), retry=False), 200)
    assert answer["status"] == "failed"
    assert api.get(job["id"])["status"] == "failed"


def test_expired_lease_without_retries_left_fails(api: Api, queue: str) -> None:
    job = api.submit(queue=queue, max_retries=0, timeout=0.5)
    leased = api.lease_one(queue)
    final = api.wait_finished(job["id"], timeout=10)
    assert final["status"] == "failed"
    assert final["error"]["type"] == "LeaseExpired"
    assert_problem(api.complete(leased, "late"), 409, "stale-lease")


# --- scheduling -------------------------------------------------------------------------


def test_delay_and_run_at_jobs_are_not_leased_early(api: Api, queue: str) -> None:
    started = time.monotonic()
    delayed = api.submit(queue=queue, delay=1.2)
    # An offset other than UTC's must mean the same instant.
    india = timezone(timedelta(hours=5, minutes=30))
    at = api.submit(queue=queue, run_at=rfc3339((now() + timedelta(seconds=1.2)).astimezone(india)))
    for job in (delayed, at):
        assert job["status"] == "scheduled"
        assert (ts(job["run_at"]) - ts(job["created_at"])).total_seconds() >= 1.1

    assert api.lease(queue, max_jobs=2, wait=0.5) == []
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while len(got) < 2 and time.monotonic() < deadline:
        got += api.lease(queue, max_jobs=2 - len(got), wait=5)
    elapsed = time.monotonic() - started
    assert sorted(job["id"] for job in got) == sorted([delayed["id"], at["id"]])
    assert elapsed >= 1.15, f"a scheduled job was leased after {elapsed:.2f}s"
    assert elapsed < 6, f"scheduled jobs were not promoted promptly ({elapsed:.2f}s)"


def test_run_at_in_the_past_is_ready_now(api: Api, queue: str) -> None:
    job = api.submit(queue=queue, run_at="2001-02-03T04:05:06+01:00")
    assert job["status"] == "queued"
    # A short wait, not 0: a single submit's Redis publish runs beside its 202 (the
    # submit batcher), and a loaded machine can lease in between.
    assert api.lease_one(queue, wait=2)["id"] == job["id"]


def test_expired_jobs_are_never_leased(api: Api, queue: str) -> None:
    past = api.submit(queue=queue, expires_at=rfc3339(now() - timedelta(seconds=10)))
    assert api.lease(queue, wait=0) == []
    # Due after its expiry: it must expire, not be promoted and run.
    soon = api.submit(queue=queue, delay=1.0, expires_at=rfc3339(now() + timedelta(seconds=0.5)))
    for job in (past, soon):
        final = api.wait_finished(job["id"], timeout=10)
        assert final["status"] == "expired"
        assert final["attempt"] == 0
        assert final["finished_at"] is not None
    assert api.lease(queue, max_jobs=5, wait=0.5) == []
    assert api.queue_counts(queue) == {"expired": 2}

    # An expired job retried by hand runs (its stale expiry is dropped).
    again = expect(api.retry(past["id"]), 200)
    assert again["status"] == "queued"
    assert again["expires_at"] is None
    assert api.lease_one(queue)["id"] == past["id"]


def test_queued_job_expiring_soon_expires_unleased(api: Api, queue: str) -> None:
    job = api.submit(queue=queue, expires_at=rfc3339(now() + timedelta(seconds=0.5)))
    assert job["status"] == "queued"
    final = api.wait_finished(job["id"], timeout=10)
    assert final["status"] == "expired"
    assert api.lease(queue, wait=0) == []


# --- ordering ---------------------------------------------------------------------------


def test_priority_order_in_one_batch(api: Api, queue: str) -> None:
    jobs = api.submit_batch(
        [
            {"queue": queue, "task": "p0-first", "priority": 0},
            {"queue": queue, "task": "p9-first", "priority": 9},
            {"queue": queue, "task": "p0-second", "priority": 0},
            {"queue": queue, "task": "p9-second", "priority": 9},
            {"queue": queue, "task": "p5", "priority": 5},
            {"queue": queue, "task": "p0-third", "priority": 0},
        ]
    )
    assert len(jobs) == 6
    order = [api.lease_one(queue, wait=0)["task"] for _ in range(6)]
    assert order == ["p9-first", "p9-second", "p5", "p0-first", "p0-second", "p0-third"]


def test_priority_order_in_one_lease(api: Api, queue: str) -> None:
    # One job per batch: a batch's answer waits for its Redis publish, a single submit's
    # does not (the submit batcher publishes beside its 202), and a lease with no wait
    # must find all four.
    for task, priority in (("a0", 0), ("b9", 9), ("c0", 0), ("d9", 9)):
        api.submit_batch([{"queue": queue, "task": task, "priority": priority}])
    leased = api.lease(queue, max_jobs=4, wait=0)
    assert [job["task"] for job in leased] == ["b9", "d9", "a0", "c0"]


def test_queues_are_served_in_the_order_given(api: Api, queue: str) -> None:
    first, second = f"{queue}_first", f"{queue}_second"
    # Distinct priorities inside each queue, so only the queue order is under test here.
    api.submit_batch([{"queue": second, "task": f"s{i}", "priority": 9 - i} for i in range(2)])
    api.submit_batch([{"queue": first, "task": f"f{i}", "priority": 1 - i} for i in range(2)])
    leased = api.lease([first, second], max_jobs=3, wait=0)
    assert [job["queue"] for job in leased] == [first, first, second]
    assert [job["task"] for job in leased] == ["f0", "f1", "s0"]
    # A queue not asked for is never served.
    assert api.lease([f"{queue}_other"], wait=0) == []
    assert api.lease([second, first], max_jobs=3, wait=0)[0]["task"] == "s1"


# --- cancel -----------------------------------------------------------------------------


def test_cancel_a_queued_job(api: Api, queue: str) -> None:
    job = api.submit(queue=queue)
    cancelled = expect(api.cancel(job["id"]), 200)
    assert cancelled["status"] == "cancelled"
    assert cancelled["finished_at"] is not None
    assert api.lease(queue, wait=0.3) == []
    assert api.wait_finished(job["id"], timeout=5)["status"] == "cancelled"
    assert_problem(api.cancel(job["id"]), 409, "job-finished")


def test_cancel_a_scheduled_job(api: Api, queue: str) -> None:
    job = api.submit(queue=queue, delay=0.5)
    assert expect(api.cancel(job["id"]), 200)["status"] == "cancelled"
    assert api.lease(queue, wait=0.8) == []
    assert api.get(job["id"])["status"] == "cancelled"


def test_cancel_a_running_job(api: Api, service: Service, queue: str) -> None:
    job = api.submit(queue=queue, max_retries=3)
    leased = api.lease_one(queue)
    waiter = ThreadPoolExecutor(1)
    with Api(service.url) as other:
        finished = waiter.submit(other.get, job["id"], 20)
        answer = expect(api.cancel(job["id"]), 200)
        assert answer["status"] == "running"
        assert answer["cancel_requested"] is True
        beat = expect(api.heartbeat(leased), 200)
        assert beat["cancel_requested"] is True
        # The worker stops and reports a failure: with cancel requested, it is cancelled,
        # not retried.
        final = expect(api.fail(leased, "Cancelled", "stopped on request"), 200)
        assert final["status"] == "cancelled"
        assert finished.result(timeout=20)["status"] == "cancelled"
    waiter.shutdown()
    assert api.lease(queue, wait=0) == []
    assert expect(api.retry(job["id"]), 200)["cancel_requested"] is False


def test_cancelled_running_job_whose_worker_died(api: Api, queue: str) -> None:
    job = api.submit(queue=queue, timeout=0.5)
    api.lease_one(queue)
    expect(api.cancel(job["id"]), 200)
    # Nobody heartbeats: the reclaim finishes it as cancelled instead of running it again.
    assert api.wait_finished(job["id"], timeout=10)["status"] == "cancelled"
    assert api.lease(queue, wait=0) == []


# --- idempotency ------------------------------------------------------------------------


def test_idempotency_replay_and_mismatch(api: Api, queue: str) -> None:
    key = f"key-{uuid.uuid4()}"
    body = {"task": "tests.once", "queue": queue, "args": [1], "kwargs": {"a": [1, 2]}}
    first = api.http.post("/jobs", json=body, headers={"Idempotency-Key": key})
    created = expect(first, 202)
    assert "idempotent-replayed" not in first.headers

    # Same key and body, keys in another order: the original job, not a new one.
    replay = api.http.post(
        "/jobs",
        json={"kwargs": {"a": [1, 2]}, "args": [1], "queue": queue, "task": "tests.once"},
        headers={"Idempotency-Key": key},
    )
    replayed = expect(replay, 200)
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.headers["location"] == f"/jobs/{created['id']}"
    assert replayed["id"] == created["id"]

    # Once it has run, a replay answers with its current state.
    expect(api.complete(api.lease_one(queue), "once"), 200)
    later = api.http.post("/jobs", json=body, headers={"Idempotency-Key": key})
    assert expect(later, 200)["status"] == "succeeded"

    mismatch = api.http.post("/jobs", json={**body, "args": [2]}, headers={"Idempotency-Key": key})
    assert_problem(mismatch, 422, "idempotency-mismatch")
    assert api.queue_counts(queue) == {"succeeded": 1}

    other = api.http.post("/jobs", json=body, headers={"Idempotency-Key": key + "-2"})
    assert expect(other, 202)["id"] != created["id"]


def test_idempotent_submits_racing(api: Api, service: Service, queue: str) -> None:
    key = f"race-{uuid.uuid4()}"
    body = {"task": "tests.race", "queue": queue}

    def post(_: int) -> tuple[int, str]:
        with Api(service.url) as client:
            response = client.http.post("/jobs", json=body, headers={"Idempotency-Key": key})
            return response.status_code, response.json().get("id", response.text)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(post, range(6)))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] * 5 + [202], answers
    assert len({job_id for _, job_id in answers}) == 1
    assert api.queue_counts(queue) == {"queued": 1}


def test_keyed_submits_in_one_group_commit(api: Api, service: Service, queue: str) -> None:
    """Keyed submits share the group commit with each other: a key sent by ten requests
    at once (likely in one group) is one job, the others replays of it; ten distinct
    keys are ten jobs."""
    shared = f"shared-{uuid.uuid4()}"
    keys = [shared] * 10 + [f"own-{uuid.uuid4()}" for _ in range(10)]
    start = threading.Barrier(len(keys))

    def post(key: str) -> tuple[str, int, str]:
        with Api(service.url) as client:
            start.wait(timeout=30)
            body = {"task": "tests.group", "queue": queue, "args": [key == shared]}
            response = client.http.post("/jobs", json=body, headers={"Idempotency-Key": key})
            return key, response.status_code, response.json().get("id", response.text)

    with ThreadPoolExecutor(len(keys)) as pool:
        answers = list(pool.map(post, keys))
    on_shared = [(status, job_id) for key, status, job_id in answers if key == shared]
    assert sorted(status for status, _ in on_shared) == [200] * 9 + [202], answers
    assert len({job_id for _, job_id in on_shared}) == 1, answers
    own = [(status, job_id) for key, status, job_id in answers if key != shared]
    assert [status for status, _ in own] == [202] * 10, answers
    assert len({job_id for _, job_id in own} | {on_shared[0][1]}) == 11
    assert api.queue_counts(queue) == {"queued": 11}


# --- listing and statistics --------------------------------------------------------------


def test_list_jobs_filters_and_cursor_pagination(api: Api, queue: str) -> None:
    created = [api.submit(queue=queue, task="tests.a" if i % 2 else "tests.b") for i in range(7)]
    newest_first = [job["id"] for job in reversed(created)]

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"queue": queue, "limit": 3}
        if cursor is not None:
            params["cursor"] = cursor
        page = api.list_jobs(**params)
        pages += 1
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert pages < 10
    assert seen == newest_first
    assert pages == 3

    by_task = api.list_jobs(queue=queue, task="tests.a")["jobs"]
    assert [job["id"] for job in by_task] == [
        j["id"] for j in reversed(created) if j["task"] == "tests.a"
    ]

    expect(api.complete(api.lease_one(queue), "x"), 200)
    succeeded = api.list_jobs(queue=queue, status="succeeded")["jobs"]
    assert len(succeeded) == 1 and succeeded[0]["status"] == "succeeded"
    queued = api.list_jobs(queue=queue, status="queued", limit=500)
    assert len(queued["jobs"]) == 6 and queued["next_cursor"] is None
    assert api.list_jobs(queue=queue, task="tests.none")["jobs"] == []
    # Exactly a page: no next cursor, or one that leads to an empty page.
    exact = api.list_jobs(queue=queue, limit=7)
    assert len(exact["jobs"]) == 7
    assert exact["next_cursor"] is None


def test_list_jobs_bad_cursor(api: Api) -> None:
    for cursor in ("garbage!", "AAAA", "bm90LWEtdXVpZA"):
        assert_problem(api.http.get("/jobs", params={"cursor": cursor}), 400, "invalid-cursor")


def test_queue_counts(api: Api, queue: str) -> None:
    api.submit_batch([{"queue": queue} for _ in range(4)])
    api.submit(queue=queue, delay=60)
    expect(api.complete(api.lease_one(queue), None), 200)
    api.lease_one(queue)
    expect(api.cancel(api.list_jobs(queue=queue, status="queued")["jobs"][0]["id"]), 200)
    queues = expect(api.http.get("/queues"), 200)["queues"]
    [entry] = [q for q in queues if q["name"] == queue]
    assert entry["counts"] == {
        "queued": 1,
        "running": 1,
        "succeeded": 1,
        "cancelled": 1,
        "scheduled": 1,
    }
    assert 0 <= entry["oldest_queued_age_seconds"] < 60
    names = [q["name"] for q in queues]
    assert names == sorted(names)


def test_health_and_readiness(api: Api, backend: Backend) -> None:
    assert expect(api.http.get("/healthz"), 200)["status"] == "ok"
    ready = expect(api.http.get("/readyz"), 200)
    assert ready == {"status": "ok", "checks": {"broker": "ok", "database": "ok"}}


# --- Redis: the index is only an index -----------------------------------------------------


def drain(api: Api, queue: str, count: int, timeout: float = 60.0) -> list[str]:
    """Lease and complete ``count`` jobs from ``queue`` in batches; return their ids."""
    done: list[str] = []
    deadline = time.monotonic() + timeout
    while len(done) < count:
        assert time.monotonic() < deadline, f"only {len(done)} of {count} jobs leased"
        leased = api.lease(queue, max_jobs=250, wait=2, lease_seconds=60)
        if not leased:
            continue
        reports = [
            {
                "id": j["id"],
                "token": j["lease"]["token"],
                "outcome": "succeeded",
                "result": j["args"],
            }
            for j in leased
        ]
        answer = expect(api.http.post("/leases/report", json={"reports": reports}), 200)
        assert all(item["ok"] for item in answer["reports"]), answer
        done += [j["id"] for j in leased]
    return done


def submit_many(api: Api, queue: str, count: int) -> list[str]:
    jobs = api.submit_batch(
        [{"queue": queue, "task": "tests.bulk", "args": [i]} for i in range(count)]
    )
    return [job["id"] for job in jobs]


@pytest.mark.brokers("redis")
def test_redis_index_deleted_is_rebuilt(api: Api, backend: Backend, queue: str) -> None:
    from conftest import delete_redis_prefix

    ids = submit_many(api, queue, 1000)
    # The equivalent of FLUSHDB for this service's index: every key under its prefix.
    assert delete_redis_prefix(backend.redis_prefix) > 0
    done = drain(api, queue, 1000)
    assert sorted(done) == sorted(ids)
    assert len(set(done)) == 1000, "a job was leased twice"
    assert api.queue_counts(queue) == {"succeeded": 1000}
    assert api.lease(queue, wait=0) == []


@pytest.mark.brokers("redis")
@pytest.mark.first_backend_only  # it starts a service of its own: once is enough
def test_redis_flushdb_is_repaired(backend: Backend, spawner: Spawner, queue: str) -> None:
    from conftest import redis_client

    dedicated = spawner.backend(backend.database, "redis", redis_db=9)
    service = spawner.service(dedicated)
    api = spawner.api(service.url)
    ids = submit_many(api, queue, 1000)
    client = redis_client(9)
    try:
        assert client.dbsize() > 0
        client.flushdb()
    finally:
        client.close()
    assert expect(api.http.get("/readyz"), 200)["status"] == "ok"
    done = drain(api, queue, 1000)
    assert sorted(done) == sorted(ids)
    assert api.queue_counts(queue) == {"succeeded": 1000}


# --- a worker killed mid-job --------------------------------------------------------------


@ONE_OF_EACH
def test_worker_killed_mid_job_is_run_again(
    api: Api, service: Service, spawner: Spawner, queue: str
) -> None:
    job = api.submit(queue=queue, task="tests.hang_first_attempt", args=["kill-test"], timeout=2)

    def worker(name: str) -> Any:
        command = [
            sys.executable, "-m", "celeriac", "worker",
            "--app", "tasks_for_tests:app",
            "--server", service.url,
            "-c", "1", "-Q", queue, "-l", "warning",
            "--hostname", name, "--poll-wait", "1",
        ]  # fmt: skip
        return spawner.process(command, name)

    doomed = worker("doomed")
    try:
        running = api.wait_for(
            lambda j: j["status"] == "running" or j["status"] in FINISHED,
            timeout=30,
            job_id=job["id"],
            what="the first worker to start the job",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nworker log:\n{doomed.log()}") from None
    assert running["status"] == "running", f"{running}\n{doomed.log()}"
    assert running["worker"] == "doomed"
    survivor = worker("survivor")  # starts up meanwhile; it finds nothing to lease yet
    # The first worker's heartbeats keep the 2 s lease alive while it lives.
    assert api.get(job["id"], wait=3)["status"] == "running", doomed.log()
    assert api.get(job["id"])["attempt"] == 1
    doomed.kill()

    final = api.get(job["id"], wait=30)
    assert final["status"] == "succeeded", f"{final}\n{survivor.log()}"
    assert final["result"] == "kill-test: done on attempt 2"
    assert final["attempt"] == 2
    assert final["worker"] == "survivor"
    assert survivor.stop() == 0, survivor.log()


def test_the_service_dumps_its_stacks_on_sigusr1_and_goes_on(spawner: Spawner) -> None:
    service = spawner.service()
    service.proc.send_signal(signal.SIGUSR1)
    with Api(service.url) as client:
        client.wait_for(
            lambda: "most recent call first" in service.log(), timeout=10, what="the stack dump"
        )
        expect(client.http.get("/readyz"), 200)


def test_a_long_poll_ends_with_its_client_and_does_not_hold_up_a_stop(
    spawner: Spawner,
) -> None:
    """A worker that gives up on its long-poll (it stopped, or died) must not leave the
    request waiting in the service until its 30 s run out: a stopping service would wait
    for it (uvicorn's 3 s grace), and it would claim, then hand back, the next job."""
    service = spawner.service()
    body = json.dumps({"worker": "gone", "queues": ["q_gone"], "max_jobs": 1, "wait": 30})
    poll = http.client.HTTPConnection("127.0.0.1", int(service.url.rsplit(":", 1)[1]))
    poll.request("POST", "/leases", body, {"Content-Type": "application/json"})
    time.sleep(0.3)  # into its wait (nothing to wait on: the request is in another process)
    poll.sock.shutdown(socket.SHUT_WR)  # the worker's way of leaving (docs/protocol.md)
    # The service ends the wait at once, answers (nothing was granted), and closes.
    assert json.loads(poll.getresponse().read()) == {"jobs": []}
    poll.close()
    started = time.monotonic()
    assert service.stop() in (0, -signal.SIGTERM), service.log()
    assert time.monotonic() - started < 2.0, "the stop waited for an abandoned long-poll"
