"""Issue 12, findings 6 and 7: what one API key creates, another cannot touch.

One keyed service per backend (the same database as the matrix's ``backend``), with two
unrestricted keys A and B, an administrator, and a key ``T`` restricted to the queues
``kt_*``. Worker registrations and leases are bound to the key that made them (a foreign
token answers exactly like a stale one), Idempotency-Keys are scoped per key and forgotten
after CELERIAC_IDEMPOTENCY_TTL_SECONDS, and a restricted key sees and works only its
queues (docs/security.md, "API keys and tenants")."""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from conftest import (
    REDIS_HOST,
    REDIS_PORT,
    Api,
    Backend,
    Service,
    Spawner,
    assert_problem,
    expect,
)

pytestmark = pytest.mark.brokers("sql", "redis")

KEY_A = "a-" + secrets.token_hex(16)
KEY_B = "b-" + secrets.token_hex(16)
KEY_ADMIN = "adm-" + secrets.token_hex(16)
KEY_T = "t-" + secrets.token_hex(16)  # restricted to the queues kt_*
IDEMPOTENCY_TTL = 2.0
HEARTBEAT = 0.5  # a registration silent for 1 s is lost


@pytest.fixture(scope="module")
def keyed(module_spawner: Spawner, backend: Backend) -> Iterator[Service]:
    keys = (
        f"{KEY_A}:submit+read+work,{KEY_B}:submit+read+work,{KEY_ADMIN}:admin,"
        f"{KEY_T}:admin@kt_*|kt-shared"
    )
    service = module_spawner.service(
        backend,
        extra={
            "CELERIAC_API_KEYS": keys,
            "CELERIAC_IDEMPOTENCY_TTL_SECONDS": str(IDEMPOTENCY_TTL),
            "CELERIAC_WORKER_HEARTBEAT_SECONDS": str(HEARTBEAT),
        },
    )
    yield service
    # Stopped with this backend, not at the module's end: pytest ends the session-wide
    # backend when the suite moves on to the next combination, possibly mid-module, and a
    # service still running then re-indexes its jobs under a prefix already deleted.
    service.stop()


def _client(service: Service, key: str) -> Iterator[Api]:
    with Api(service.url, headers={"Authorization": f"Bearer {key}"}) as client:
        yield client


@pytest.fixture
def a(keyed: Service) -> Iterator[Api]:
    yield from _client(keyed, KEY_A)


@pytest.fixture
def b(keyed: Service) -> Iterator[Api]:
    yield from _client(keyed, KEY_B)


@pytest.fixture
def admin(keyed: Service) -> Iterator[Api]:
    yield from _client(keyed, KEY_ADMIN)


@pytest.fixture
def t(keyed: Service) -> Iterator[Api]:
    yield from _client(keyed, KEY_T)


def _register(api: Api, name: str, queues: list[str]) -> httpx.Response:
    about = {"name": name, "hostname": "h", "pid": 4242, "queues": queues,
             "concurrency": 1, "pool": "threads"}  # fmt: skip
    return api.http.post("/workers", json=about)


def _worker(api: Api, worker_id: str) -> dict[str, Any] | None:
    for entry in expect(api.http.get("/workers"), 200)["workers"]:
        if entry["id"] == worker_id:
            return dict(entry)
    return None


# --- finding 6: worker registrations and leases belong to a key ---------------------------


def test_another_key_cannot_heartbeat_or_deregister_a_worker(
    a: Api, b: Api, admin: Api, queue: str
) -> None:
    worker_id = expect(_register(a, f"w-{queue}", [queue]), 201)["id"]
    for other in (b, admin):  # bound to the key, whatever the other key's scopes
        beat = other.http.post(f"/workers/{worker_id}/heartbeat", json={"running": []})
        assert_problem(beat, 404, "worker-not-found")
        assert_problem(other.http.delete(f"/workers/{worker_id}"), 404, "worker-not-found")
    assert _worker(a, worker_id) is not None  # still registered
    assert expect(a.http.post(f"/workers/{worker_id}/heartbeat", json={"running": []}), 200)
    assert a.http.delete(f"/workers/{worker_id}").status_code == 204
    assert _worker(a, worker_id) is None


def test_registering_anothers_name_and_going_silent_ends_none_of_its_leases(
    a: Api, b: Api, queue: str
) -> None:
    """B registers A's worker name, claims A's job in its heartbeat and falls silent:
    B's registration is lost, which ends B's own lease under that name, never A's."""
    name = f"victim-{queue}"
    victim_job = a.submit(queue=queue)
    leased = a.lease_one(queue, worker=name, lease_seconds=60)
    bait = b.submit(queue=queue)
    own = b.lease_one(queue, worker=name, lease_seconds=60)
    assert own["id"] == bait["id"]
    intruder = expect(_register(b, name, [queue]), 201)["id"]
    expect(b.http.post(f"/workers/{intruder}/heartbeat",
                       json={"running": [victim_job["id"], bait["id"]]}), 200)  # fmt: skip
    # B's registration is lost: its own lease ends at once and its job is queued again
    # (the same statement and the same reclaim pass would have taken A's job).
    b.wait_for(lambda j: j["status"] == "queued", 15, job_id=bait["id"], what="B's lease ended")
    assert (_worker(b, intruder) or {}).get("status") == "lost"
    victim = a.get(victim_job["id"])
    assert victim["status"] == "running" and victim["worker"] == name, victim
    done = expect(a.complete(leased, "mine"), 200)
    assert done["status"] == "succeeded" and done["result"] == "mine"


def test_a_lease_token_is_accepted_only_from_the_key_that_leased_it(
    a: Api, b: Api, admin: Api, queue: str
) -> None:
    job = a.submit(queue=queue)
    leased = a.lease_one(queue, lease_seconds=60)
    token = leased["lease"]["token"]
    for other in (b, admin):
        assert_problem(other.heartbeat(leased), 409, "stale-lease")
        assert_problem(other.complete(leased, "forged"), 409, "stale-lease")
        assert_problem(other.fail(leased), 409, "stale-lease")
        assert_problem(other.release(leased), 409, "stale-lease")
        beat = {"leases": [{"id": job["id"], "token": token}]}
        beats = expect(other.http.post("/leases/heartbeat", json=beat), 200)
        assert beats["leases"][0]["ok"] is False
        report = {"id": job["id"], "token": token, "outcome": "succeeded", "result": "forged"}
        reports = expect(other.http.post("/leases/report", json={"reports": [report]}), 200)
        assert reports["reports"][0] == {"id": job["id"], "ok": False, "status": None,
                                         "detail": "stale-lease"}  # fmt: skip
    untouched = a.get(job["id"])
    assert untouched["status"] == "running" and untouched["attempt"] == 1, untouched
    assert expect(a.heartbeat(leased), 200)["lease"]["token"] == token
    done = expect(a.complete(leased, "mine"), 200)
    assert done["status"] == "succeeded" and done["result"] == "mine"


@pytest.mark.brokers("redis")
def test_a_redis_granted_lease_is_settled_only_over_redis(
    a: Api, keyed: Service, backend: Backend, queue: str
) -> None:
    """The Redis protocol has no API keys: its leases belong to no key, so a keyed HTTP
    caller holding the token cannot settle them (with auth off it still can)."""
    from celeriac._execution import Report
    from celeriac._transport_redis import RedisTransport

    transport = RedisTransport(
        f"redis://{REDIS_HOST}:{REDIS_PORT}/{backend.redis_db}",
        prefix=backend.redis_prefix, worker="redis-w", queues=[queue],
        lease_seconds=30, poll_wait=2,
    )  # fmt: skip
    try:
        job = a.submit(queue=queue)
        grants: list[Any] = []
        deadline = time.monotonic() + 20
        while not grants and time.monotonic() < deadline:
            grants = transport.lease(1)
        [grant] = grants
        # SQL records the Redis lease from the event stream.
        a.wait_for(lambda j: j["status"] == "running", 15, job_id=job["id"], what="the grant")
        forged = {"id": job["id"], "lease": {"token": grant.token}}
        assert_problem(a.complete(forged, "forged"), 409, "stale-lease")
        [ok] = transport.report([Report(job["id"], grant.token, "succeeded", '"redis"')])
        assert ok.ok
    finally:
        transport.close()
    done = a.wait_finished(job["id"], 20)
    assert done["status"] == "succeeded" and done["result"] == "redis", done


# --- finding 7: idempotency keys per API key, forgotten after the TTL ----------------------


def _submit_keyed(api: Api, key: str, **job: Any) -> httpx.Response:
    job.setdefault("task", "tests.noop")
    return api.http.post("/jobs", json=job, headers={"Idempotency-Key": key})


def test_idempotency_keys_are_scoped_per_api_key(a: Api, b: Api, queue: str) -> None:
    key = f"order-{uuid.uuid4()}"
    first_a = expect(_submit_keyed(a, key, queue=queue, args=[1]), 202)
    # The same key from another API key, even with another body: a job of its own.
    first_b = expect(_submit_keyed(b, key, queue=queue, args=[2]), 202)
    assert first_b["id"] != first_a["id"]
    replay_a = _submit_keyed(a, key, queue=queue, args=[1])
    assert expect(replay_a, 200)["id"] == first_a["id"]
    assert replay_a.headers["idempotent-replayed"] == "true"
    assert expect(_submit_keyed(b, key, queue=queue, args=[2]), 200)["id"] == first_b["id"]
    # Each key's own mismatch is still refused.
    assert_problem(_submit_keyed(b, key, queue=queue, args=[1]), 422, "idempotency-mismatch")
    assert {j["id"] for j in a.list_jobs(queue=queue)["jobs"]} == {first_a["id"], first_b["id"]}


def test_an_idempotency_key_is_forgotten_after_the_ttl(a: Api, queue: str) -> None:
    key = f"ttl-{uuid.uuid4()}"
    first = expect(_submit_keyed(a, key, queue=queue, args=[1]), 202)
    assert expect(_submit_keyed(a, key, queue=queue, args=[1]), 200)["id"] == first["id"]
    created = datetime.fromisoformat(first["created_at"].replace("Z", "+00:00"))
    # Nothing to wait on but the clock: until the TTL has passed since the submit.
    time.sleep(max(0.0, created.timestamp() + IDEMPOTENCY_TTL + 0.2 - time.time()))
    # Reused after the TTL, with another body even: a new job, not a replay nor a 422.
    second = expect(_submit_keyed(a, key, queue=queue, args=[2]), 202)
    assert second["id"] != first["id"]
    assert expect(_submit_keyed(a, key, queue=queue, args=[2]), 200)["id"] == second["id"]
    assert a.get(first["id"])["args"] == [1]  # the old job is kept, only its key went


# --- finding 7: keys restricted to queue patterns -------------------------------------------


def _kt() -> str:
    return f"kt_{uuid.uuid4().hex[:8]}"


def test_a_restricted_key_submits_only_to_its_queues(t: Api, admin: Api, queue: str) -> None:
    refused = assert_problem(t.http.post("/jobs", json={"task": "x", "queue": queue}), 403,
                             "forbidden")  # fmt: skip
    assert queue in refused["detail"]
    mine = _kt()
    batch = [{"task": "x", "queue": mine}, {"task": "x", "queue": queue}]
    refused = assert_problem(t.http.post("/jobs/batch", json={"jobs": batch}), 403, "forbidden")
    assert "jobs[1]" in refused["detail"] and queue in refused["detail"]
    assert admin.list_jobs(queue=queue)["jobs"] == [] == admin.list_jobs(queue=mine)["jobs"]
    assert t.submit(queue=mine)["queue"] == mine
    assert t.submit(queue="kt-shared")["queue"] == "kt-shared"


def test_a_restricted_key_reads_only_its_queues(t: Api, admin: Api, queue: str) -> None:
    mine = t.submit(queue=_kt())
    other = admin.submit(queue=queue)
    for path in ("", "/result", "/deliveries"):
        assert_problem(t.http.get(f"/jobs/{other['id']}{path}"), 404, "job-not-found")
    started = time.monotonic()
    assert_problem(t.http.get(f"/jobs/{other['id']}", params={"wait": 5}), 404, "job-not-found")
    assert time.monotonic() - started < 4  # not held: nothing to learn from the timing
    assert t.get(mine["id"])["id"] == mine["id"]
    assert_problem(t.http.get("/jobs", params={"queue": queue}), 403, "forbidden")
    listed = {j["queue"] for j in t.list_jobs(limit=500)["jobs"]}
    assert mine["queue"] in listed and all(q.startswith("kt") for q in listed), listed
    queues = {q["name"] for q in expect(t.http.get("/queues"), 200)["queues"]}
    assert mine["queue"] in queues and queue not in queues
    assert queue in {q["name"] for q in expect(admin.http.get("/queues"), 200)["queues"]}


def test_a_restricted_key_leases_only_from_its_queues(t: Api, admin: Api, queue: str) -> None:
    other = admin.submit(queue=queue)
    body = {"worker": "t-w", "queues": [_kt(), queue], "max_jobs": 1, "wait": 0}
    refused = assert_problem(t.http.post("/leases", json=body), 403, "forbidden")
    assert queue in refused["detail"]
    claim = {"worker": "t-w", "ids": [other["id"]]}
    assert expect(t.http.post("/leases/claim", json=claim), 200)["jobs"] == []
    assert admin.get(other["id"])["status"] == "queued"
    assert_problem(_register(t, "t-w", [queue]), 403, "forbidden")
    mine = t.submit(queue=_kt())
    assert t.lease_one(mine["queue"], worker="t-w")["id"] == mine["id"]


def test_a_restricted_admin_cancels_and_retries_only_in_its_queues(
    t: Api, admin: Api, queue: str
) -> None:
    other = admin.submit(queue=queue)
    assert_problem(t.cancel(other["id"]), 404, "job-not-found")
    assert admin.get(other["id"])["status"] == "queued"
    expect(admin.cancel(other["id"]), 200)
    assert_problem(t.retry(other["id"]), 404, "job-not-found")
    assert admin.get(other["id"])["status"] == "cancelled"
    mine = t.submit(queue=_kt())
    assert expect(t.cancel(mine["id"]), 200)["status"] == "cancelled"
    assert expect(t.retry(mine["id"]), 200)["status"] == "queued"


def test_schedules_are_changed_only_by_an_unrestricted_key(t: Api, admin: Api, queue: str) -> None:
    """A schedule submits jobs service-wide: a restricted key may not create one (not even
    into its own queues), and it lists only those submitting to its queues."""
    body = {"name": f"s-{queue}", "every": 3600, "enabled": False,
            "job": {"task": "x", "queue": queue}}  # fmt: skip
    assert_problem(t.http.post("/schedules", json=body), 403, "forbidden")
    own = {**body, "name": f"s-own-{queue}", "job": {"task": "x", "queue": _kt()}}
    assert_problem(t.http.post("/schedules", json=own), 403, "forbidden")
    expect(admin.http.post("/schedules", json=body), 201)
    expect(admin.http.post("/schedules", json=own), 201)
    assert_problem(t.http.post(f"/schedules/{body['name']}/trigger"), 403, "forbidden")
    assert_problem(t.http.delete(f"/schedules/{body['name']}"), 403, "forbidden")
    assert_problem(t.http.get(f"/schedules/{body['name']}"), 404, "schedule-not-found")
    names = {s["name"] for s in expect(t.http.get("/schedules"), 200)["schedules"]}
    assert own["name"] in names and body["name"] not in names
    for name in (body["name"], own["name"]):
        assert admin.http.delete(f"/schedules/{name}").status_code == 204
