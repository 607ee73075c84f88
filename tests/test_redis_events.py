"""Issue 12 (isolation): the Redis worker protocol's event stream is input. Events that
cannot be read (bad JSON, NaN, an unknown kind, a NUL, bytes that are not UTF-8) and
events the database refuses are dropped or recorded, one log line each batch or event,
and never stop the other events of their batch nor the stream consumer.

Good events are made by the protocol's own functions (FCALL); the bad ones are written
straight into the stream with redis-py, as any client with Redis access could."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Api, Service, Spawner, redis_client

from service.brokers.redis_protocol import GROUP, EarlyReports, Entry
from service.db import create_engine

POISON = {
    # The database refuses one job's completion, as it would refuse a bad value.
    "postgres": "ALTER TABLE jobs ADD CONSTRAINT poison CHECK (id <> '{id}' OR status <> "
    "'succeeded')",
    "sqlite": "CREATE TRIGGER poison BEFORE UPDATE OF status ON jobs WHEN NEW.id = '{id}' "
    "AND NEW.status = 'succeeded' BEGIN SELECT RAISE(ABORT, 'poison row'); END",
}


def fcall(client: Any, tag: str, name: str, job_id: str, *args: str) -> Any:
    return client.fcall(f"celeriac_v1_{name}", 2, f"{tag}:events", f"{tag}:job:{job_id}", "1",
                        job_id, *args)  # fmt: skip


def lease_all(client: Any, tag: str, queue: str, count: int) -> dict[str, str]:
    """job id -> lease token, leased straight from Redis as a Redis worker would."""
    tokens: dict[str, str] = {}
    deadline = time.monotonic() + 10
    while len(tokens) < count and time.monotonic() < deadline:
        answer = client.fcall("celeriac_v1_lease", 2, f"{tag}:events", f"{tag}:ready:{queue}",
                              "1", "events-test", str(count), "30000")  # fmt: skip
        for raw in answer:
            job = json.loads(raw)
            tokens[job["id"]] = job["lease"]["token"]
        if not answer:
            client.blpop([f"{tag}:wake:{queue}"], 0.2)  # the service wakes us on publish
    assert len(tokens) == count, tokens
    return tokens


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_bad_events_do_not_stop_the_good_ones(spawner: Spawner, queue: str, database: str) -> None:
    backend = spawner.backend(database, "redis")
    service: Service = spawner.service(backend)
    api: Api = spawner.api(service.url)
    tag = "{" + backend.redis_prefix + "}"
    jobs = [api.submit(queue=queue, max_retries=0)["id"] for _ in range(6)]
    good, nan, unknown, nul, refused, after = jobs
    engine = create_engine(backend.database_url)
    with engine.begin() as conn:
        conn.execute(sa.text(POISON[database].format(id=refused)))
    engine.dispose()
    client = redis_client(backend.redis_db)
    try:
        tokens = lease_all(client, tag, queue, 6)
        with client.pipeline(transaction=False) as pipe:
            fcall(pipe, tag, "complete", good, tokens[good], "5")
            stream = f"{tag}:events"
            pipe.xadd(stream, {"k": "C", "id": nan, "t": tokens[nan], "r": "[NaN]"})
            pipe.xadd(stream, {"k": "Z", "id": unknown, "t": tokens[unknown]})
            pipe.xadd(stream, {"k": "F", "id": nul, "t": tokens[nul], "retry": "1", "in": "",
                               "e": '{"type": "Boom", "message": "a\\u0000b"}'})  # fmt: skip
            pipe.xadd(stream, {"k": b"C\xff\xfe", "id": b"\xff" * 36, "t": "x"})
            pipe.xadd(stream, {"k": "H", "id": good, "t": tokens[good], "ms": "nan", "p": ""})
            fcall(pipe, tag, "complete", refused, tokens[refused], "1")
            pipe.execute()
        done = api.wait_finished(good, 10)
        assert done["status"] == "succeeded" and done["result"] == 5, done
        # A report that cannot be read is recorded as the job's failure, saying why.
        for job_id in (nan, nul):
            failed = api.wait_finished(job_id, 10)
            assert failed["error"]["type"] == "InvalidReport", failed
        # The consumer goes on: a later event is applied too.
        fcall(client, tag, "complete", after, tokens[after], '{"ok": true}')
        assert api.wait_finished(after, 10)["result"] == {"ok": True}
        # Dropped, not applied: the unknown kind's job and the refused one still run.
        assert api.get(unknown)["status"] in ("queued", "running")
        assert api.get(refused)["status"] in ("queued", "running")
    finally:
        client.close()
    log = service.log(10**6)
    assert "Traceback" not in log, log
    assert len([line for line in log.splitlines() if refused in line]) <= 1, log


def test_a_reports_logs_are_checked_as_over_http_and_never_cost_the_report() -> None:
    from service.brokers.redis_events import decode

    job_id = "01a24877-03d9-7244-a4a1-5583813f332d"
    base = {"k": "C", "id": job_id, "t": "tok", "r": "1"}
    assert decode(base)["l"] is None
    assert decode({**base, "l": "line 1\nline 2\n"})["l"] == "line 1\nline 2\n"
    for bad in ("bell \x07", "x" * (65536 + 257)):
        event = decode({**base, "l": bad})
        assert event["k"] == "C" and event["r"] == 1  # the report still counts
        assert event["l"].startswith("[celeriac: the worker's logs were refused")
    failed = decode({"k": "F", "id": job_id, "t": "tok", "e": '{"type": "E"}', "l": "why\n"})
    assert failed["l"] == "why\n"


@dataclass
class EarlyReport:
    """A service on the Redis protocol, one job leased from Redis whose lease event the
    test read as consumer ``other-replica`` of the service's group (so the service has
    not), and the job's report, sent: what a replica sees when another holds the lease."""

    service: Service
    api: Api
    client: Any
    tag: str
    stream: str
    job: str
    lease_event: tuple[bytes, dict[bytes, bytes]]
    reported_at: float


@contextlib.contextmanager
def early_report(spawner: Spawner, queue: str, database: str) -> Iterator[EarlyReport]:
    backend = spawner.backend(database, "redis")
    service: Service = spawner.service(backend)
    api: Api = spawner.api(service.url)
    tag = "{" + backend.redis_prefix + "}"
    stream = f"{tag}:events"
    job = api.submit(queue=queue, max_retries=0)["id"]
    client = redis_client(backend.redis_db)
    try:
        lease_event = _lease_read_by_another_replica(client, tag, queue, stream)
        fcall(client, tag, "complete", job, lease_event[1][b"t"].decode(), "7")
        yield EarlyReport(service, api, client, tag, stream, job, lease_event, time.monotonic())
    finally:
        client.close()
    assert "Traceback" not in service.log(10**6)


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_a_report_that_comes_before_its_lease_waits_for_it(
    spawner: Spawner, queue: str, database: str
) -> None:
    """Replicas share the stream through one consumer group, so a job's lease event may
    be in another replica's batch when this one reads the job's report. The report is
    held (unacknowledged) until the lease reaches SQL, then applied: it used to be
    refused as stale, and the job stayed running until its lease ran out, then ran again.

    The other replica is played here by a consumer of the same group that reads the
    lease event and, later, hands it back to the stream (as if it applied it late)."""
    with early_report(spawner, queue, database) as early:
        client, stream = early.client, early.stream
        deadline = time.monotonic() + 10
        while not _report_read_by_the_service(client, stream):
            assert time.monotonic() < deadline, "the service never read the report"
            time.sleep(0.02)
        assert early.api.get(early.job)["status"] == "queued"  # held: not applied, not dropped
        entry_id, fields = early.lease_event
        with client.pipeline(transaction=True) as pipe:  # the other replica, at last
            pipe.xadd(stream, fields)
            pipe.xack(stream, GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            pipe.execute()
        done = early.api.wait_finished(early.job, 10)
        assert (done["status"], done["result"], done["attempt"]) == ("succeeded", 7, 1), done


def test_a_report_whose_lease_never_reaches_sql_is_dropped_in_the_end(
    spawner: Spawner, queue: str
) -> None:
    """Held at most EARLY_SECONDS: a report whose job SQL still has queued then is refused
    as stale and dropped, as any stale report (a lease that ran out and was reclaimed)."""
    from service.brokers.redis_protocol import EARLY_SECONDS

    with early_report(spawner, queue, "sqlite") as early:
        while any(f[b"k"] == b"C" for _i, f in early.client.xrange(early.stream)):
            assert time.monotonic() - early.reported_at < EARLY_SECONDS + 10, "never dropped"
            time.sleep(0.1)
        assert time.monotonic() - early.reported_at >= EARLY_SECONDS - 1  # held that long
        assert early.api.get(early.job)["status"] == "queued"
        # Decided, so its tombstone goes as any applied report's (it would hold the job
        # back from the reconciler for an hour).
        assert 0 < early.client.ttl(f"{early.tag}:job:{early.job}") <= 30
    assert f"report for job {early.job} dropped" in early.service.log(10**6)


def test_early_reports_are_held_a_while_and_a_bounded_number() -> None:
    def report(n: int) -> Entry:
        return f"{n}-0", {"k": "C", "id": f"job-{n}", "t": "token"}

    held = EarlyReports(limit=2)
    entries = [report(n) for n in range(3)] + [("9-0", {"k": "L", "id": "job-0"})]
    early = {"job-0", "job-1", "job-2"}
    assert held.hold(entries, early, now=100.0) == {"job-0", "job-1"}  # the limit
    assert [entry_id for entry_id, _f in held.take()] == ["0-0", "1-0"]
    assert not held.holds("2-0") and not held.holds("9-0")
    # Applied again: job-1's lease reached SQL meanwhile, job-0's did not.
    assert held.hold(held.take(), {"job-0"}, now=105.0) == {"job-0"}
    assert held.holds("0-0") and not held.holds("1-0")
    # Held since 100: at 110 it is dropped, however often it comes back early.
    assert held.hold(held.take(), {"job-0"}, now=110.0) == set()
    assert not held


def _lease_read_by_another_replica(
    client: Any, tag: str, queue: str, stream: str
) -> tuple[bytes, dict[bytes, bytes]]:
    """Lease the queue's job from Redis and read the lease event as consumer
    ``other-replica``, in one transaction: the service, blocked on the stream, is only
    served after it, so it cannot read the event first."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with client.pipeline(transaction=True) as pipe:
            pipe.fcall("celeriac_v1_lease", 2, stream, f"{tag}:ready:{queue}", "1",
                       "early-test", "1", "30000")  # fmt: skip
            pipe.xreadgroup(GROUP, "other-replica", {stream: ">"}, count=100)
            leased, read = pipe.execute()
        if leased:
            entries = read[0][1]
            assert [fields[b"k"] for _id, fields in entries] == [b"L"], entries
            return entries[0]
        client.blpop([f"{tag}:wake:{queue}"], 0.2)  # not indexed yet: wait for the push
    raise AssertionError("the job never reached the Redis index")


def _report_read_by_the_service(client: Any, stream: str) -> bool:
    """Whether the service read the report: it is pending on the service's consumer
    (held), or gone from the stream (applied or dropped, then acknowledged and deleted)."""
    reports = [i for i, fields in client.xrange(stream) if fields[b"k"] == b"C"]
    if not reports:
        return True
    pending = client.xpending_range(stream, GROUP, min="-", max="+", count=100)
    return any(p["message_id"] in reports and p["consumer"] != b"other-replica" for p in pending)
