"""Hostile values (issue 12, findings 3, 4, 5 and 9): every value a client sends is
checked before anything is stored, so no row can fail at insert, in a sweep or at
delivery. Each test sends exactly the inputs the issue reports, over HTTP to real
services, and checks the 4xx problem, that nothing was stored, and that a good request
right after still succeeds."""

from __future__ import annotations

import concurrent.futures
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import (
    DATABASES,
    SELECTED_BACKENDS,
    Api,
    Service,
    Spawner,
    assert_problem,
    expect,
    service_command,
)

from service.models import JOBS_TABLE

pytestmark = pytest.mark.timeout(120)

# Finding 5: URLs that could not be parsed at delivery, and the rest of what is refused.
BAD_WEBHOOK_URLS = [
    "http://0177.0.0.1/",  # octal: not a canonical dotted quad
    "http://1.2.3.999/",
    "http://0x7f.1/",
    "http://1.2.3/",
    "http://xn--/",
    "http://a..b/",
    "http://" + "a" * 64 + ".example.com/",  # a label over 63 characters
    "http://" + ".".join(["a" * 60] * 5) + ".com/",  # a host name over 253 characters
    "http://user:secret@example.com/",
    "http://example.com:70000/",
    "http://example.com:0/",
    "ftp://example.com/",
    "file:///etc/passwd",
    "http://exa mple.com/",
    "http://example.com/\x01",
    "http://example.com/a\nb",
    "http://-bad-.example.com/",
    "http://[::1/",
]

DATE_OVERFLOWS = [
    "9999-12-31T23:59:59-01:00",  # overflows on conversion to UTC
    "0001-01-01T00:00:00+01:00",
    "9000-01-01T00:00:01Z",  # just past the documented range
    "1969-12-31T23:59:59Z",
]


def _job_bodies(queue: str) -> list[dict[str, Any]]:
    job = {"task": "tests.noop", "queue": queue}
    bodies: list[dict[str, Any]] = []
    for when in DATE_OVERFLOWS:
        bodies += [{**job, "run_at": when}, {**job, "expires_at": when}]
    bodies += [
        {**job, "run_at": 1_700_000_000},  # a number is not an RFC 3339 date
        # JSON booleans (and strings) are not numbers.
        {**job, "priority": True},
        {**job, "delay": False},
        {**job, "max_retries": True},
        {**job, "timeout": True},
        {**job, "result_ttl": "5"},
        {**job, "retry_backoff": {"base": True}},
        {**job, "retry_backoff": {"jitter": 1}},
        # Floats that end up added to a date are bounded.
        {**job, "delay": 1e300},
        {**job, "result_ttl": 1e300},
        {**job, "timeout": 1e300},
    ]
    bodies += [{**job, "webhook": {"url": url}} for url in BAD_WEBHOOK_URLS]
    return bodies


def test_hostile_job_values_are_refused_and_store_nothing(api: Api, queue: str) -> None:
    for body in _job_bodies(queue):
        problem = assert_problem(api.http.post("/jobs", json=body), 422, "validation-failed")
        assert problem["errors"], problem
    # A batch with one bad job among good ones: refused whole, nothing stored.
    good = {"task": "tests.noop", "queue": queue}
    batch = [good, good, {**good, "run_at": DATE_OVERFLOWS[0]}, good]
    problem = assert_problem(api.http.post("/jobs/batch", json={"jobs": batch}), 422)
    assert "jobs.2.run_at" in problem["detail"], problem
    # The Idempotency-Key header: one line, at most 255 characters.
    for key in ("tab\tinside", "k" * 256):
        response = api.http.post("/jobs", json=good, headers={"Idempotency-Key": key})
        assert_problem(response, 422, "validation-failed")
    assert api.queue_counts(queue) == {}, "a refused job was stored"
    assert api.list_jobs(queue=queue)["jobs"] == []
    # The edges of the range, and a good submit, still go through.
    api.submit(queue=queue, run_at="8999-12-31T23:59:59+01:00")
    api.submit(queue=queue, expires_at="1970-01-01T00:00:00Z", delay=0)
    api.submit(queue=queue, webhook={"url": "https://例え.jp:8443/hook?x=1"}, timeout=30)
    assert sum(api.queue_counts(queue).values()) == 3


def test_a_bad_row_among_concurrent_good_submits(api: Api, queue: str) -> None:
    """Finding 3: the overflowing date no longer reaches the group commit."""
    good = {"task": "tests.noop", "queue": queue}
    bad = {**good, "run_at": "9999-12-31T23:59:59-01:00"}
    bodies = [good] * 20 + [bad] + [good] * 20
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda b: api.http.post("/jobs", json=b).status_code, bodies))
    assert codes.count(202) == 40 and codes[20] == 422, codes
    assert api.queue_counts(queue) == {"queued": 40}


def test_hostile_worker_values(api: Api, queue: str) -> None:
    """Findings 4 and 9: the worker registry and the worker protocol."""
    worker = {
        "name": f"{queue}-w",
        "hostname": "host-1",
        "pid": 1234,
        "queues": [queue],
        "concurrency": 4,
        "pool": "threads",
        "version": "1.0",
    }
    for change in (
        {"pid": 2**64},
        {"pid": 2**31},
        {"pid": 0},
        {"pid": False},
        {"pid": 12.0},
        {"concurrency": True},
        {"hostname": "host\n1"},
        {"hostname": "host\x1b[31m"},
        {"version": "1.0\r"},
        {"version": "\x7f"},
        {"name": f"{queue}\x07"},
    ):
        response = api.http.post("/workers", json={**worker, **change})
        assert_problem(response, 422, "validation-failed")
    listed = expect(api.http.get("/workers"), 200)["workers"]
    assert not [w for w in listed if w["name"].startswith(queue)], "a refused worker was stored"
    expect(api.http.post("/workers", json=worker), 201)

    lease = {"worker": f"{queue}-w", "queues": [queue]}
    for change in (
        {"wait": False},
        {"max_jobs": True},
        {"lease_seconds": True},
        {"wait": "1"},
        {"worker": "w\tx"},
        {"worker": "w\x01x"},
    ):
        assert_problem(api.http.post("/leases", json={**lease, **change}), 422)
    assert api.lease(queue) == []  # a good lease still answers

    api.submit(queue=queue)
    leased = api.lease_one(queue)
    job_id, token = leased["id"], leased["lease"]["token"]
    big = {"blob": "x" * (64 * 1024)}  # over PROGRESS_MAX_BYTES once encoded
    assert_problem(api.heartbeat(leased, progress=big), 422, "validation-failed")
    many = {"leases": [{"id": job_id, "token": token, "progress": big}]}
    assert_problem(api.http.post("/leases/heartbeat", json=many), 422)
    many = {"leases": [{"id": "a" * 300, "token": token}]}
    assert_problem(api.http.post("/leases/heartbeat", json=many), 422)
    assert api.get(job_id)["progress"] is None, "refused progress was stored"
    expect(api.heartbeat(leased, progress={"done": 1, "of": 2}), 200)

    for error in (
        {"type": "Boom\n"},
        {"type": "Boom", "message": "\x1b[2J"},
        {"type": "Boom", "traceback": "line\x0bline"},
    ):
        response = api.http.post(f"/jobs/{job_id}/fail", json={"token": token, "error": error})
        assert_problem(response, 422, "validation-failed")
    assert api.get(job_id)["status"] == "running"
    # Free text keeps tab, LF and CR.
    error = {"type": "Boom", "message": "line 1\n\tline 2\r\n", "traceback": "a\r\n\tb"}
    body = {"token": token, "error": error, "retry": False}
    failed = expect(api.http.post(f"/jobs/{job_id}/fail", json=body), 200)
    assert failed["error"] == error


def test_hostile_schedule_values(api: Api, queue: str) -> None:
    name = f"{queue}-s"
    schedule = {"name": name, "every": 60, "job": {"task": "tests.noop", "queue": queue}}
    for change in (
        {"start_at": "0001-01-01T00:00:00+01:00"},
        {"end_at": "9999-12-31T23:59:59-01:00"},
        {"start_at": "1969-07-20T20:17:00Z"},
        {"every": True},
        {"every": None, "cron": "* * * * *\n"},
        {"timezone": "UTC\x01"},
        {"enabled": 1},
        {"job": {"task": "tests.noop", "queue": queue, "priority": False}},
    ):
        response = api.http.post("/schedules", json={**schedule, **change})
        assert_problem(response, 422, "validation-failed")
    assert_problem(api.http.get(f"/schedules/{name}"), 404)
    created = expect(api.http.post("/schedules", json=schedule), 201)
    for change in ({"end_at": "9999-12-31T23:59:59-01:00"}, {"every": False}):
        assert_problem(api.http.patch(f"/schedules/{name}", json=change), 422)
    assert expect(api.http.get(f"/schedules/{name}"), 200) == created
    expect(api.http.delete(f"/schedules/{name}"), 204)


# --- result-store ids (finding 9) --------------------------------------------------------


def _databases() -> list[str]:
    return [d for d in DATABASES if any(b.startswith(f"{d}-") for b in SELECTED_BACKENDS)]


@pytest.fixture(scope="module", params=_databases())
def store_service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Service, Path]]:
    """A service with a result store of its own and a small inline limit."""
    workdir = tmp_path_factory.mktemp(f"hostile-{request.param}")
    spawner = Spawner(workdir)
    store = workdir / "store"
    try:
        backend = spawner.backend(str(request.param), "sql")
        extra = {
            "CELERIAC_RESULT_STORE": store.as_uri(),
            "CELERIAC_RESULT_INLINE_MAX_BYTES": "100",
        }
        yield spawner.service(backend, extra), store
    finally:
        spawner.close()


def _files(store: Path) -> list[Path]:
    return sorted(store.rglob("*")) if store.exists() else []


def test_result_store_ids_and_tokens(store_service: tuple[Service, Path], queue: str) -> None:
    service, store = store_service
    large = {"data": "r" * 1000}
    with Api(service.url) as api:
        api.submit(queue=queue)
        leased = api.lease_one(queue)
        before = _files(store)
        for job_id in ("%00", "a" * 300, "..%2F..%2Fetc", "0190c3a5-0000-7000-8000-000000000000"):
            # A control character in the URL is refused by the gate (400), the rest 404.
            status = 400 if job_id == "%00" else 404
            body = {"token": leased["lease"]["token"], "result": large}
            assert_problem(api.http.post(f"/jobs/{job_id}/complete", json=body), status)
            beat = {"token": leased["lease"]["token"]}
            assert_problem(api.http.post(f"/jobs/{job_id}/heartbeat", json=beat), status)
        report = {"id": "a" * 300, "token": "t", "outcome": "succeeded", "result": large}
        assert_problem(api.http.post("/leases/report", json={"reports": [report]}), 422)
        # A stale token never reaches the file system either.
        stale = {"token": "not-the-token", "result": large}
        assert_problem(api.http.post(f"/jobs/{leased['id']}/complete", json=stale), 409)
        stale_report = {**report, "id": leased["id"], "token": "not-the-token"}
        answer = expect(api.http.post("/leases/report", json={"reports": [stale_report]}), 200)
        assert answer["reports"][0]["ok"] is False
        assert _files(store) == before, "a refused report wrote to the result store"
        done = expect(api.complete(leased, large), 200)
        assert done["result_stored"] is True and api.get(leased["id"])["result"] == large
        assert len([p for p in _files(store) if p.is_file()]) == len(before) + 1


# --- webhook delivery (finding 5) --------------------------------------------------------

SHORT_RETRIES = {
    "CELERIAC_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
    "CELERIAC_WEBHOOK_TIMEOUT_SECONDS": "2",
    "CELERIAC_WEBHOOK_RETRY_BASE_SECONDS": "0.1",
    "CELERIAC_WEBHOOK_RETRY_MAX_SECONDS": "0.2",
    "CELERIAC_WEBHOOK_RETRY_WINDOW_SECONDS": "1.5",
}


def _wait_delivery(api: Api, job_id: str, status: str) -> dict[str, Any]:
    def settled() -> dict[str, Any] | None:
        found = expect(api.http.get(f"/jobs/{job_id}/deliveries"), 200)["deliveries"]
        return found[-1] if found and found[-1]["status"] == status else None

    result: dict[str, Any] = api.wait_for(settled, 20, what=f"a {status} delivery")
    return result


@pytest.fixture
def hostile_receiver() -> Iterator[str]:
    """Answers every POST with 503 and a Retry-After no date can be that far from now."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            self.send_response(503)
            self.send_header("retry-after", "9" * 30)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


def test_undeliverable_webhooks_record_attempts_and_stop(
    spawner: Spawner, queue: str, hostile_receiver: str
) -> None:
    backend = spawner.backend("sqlite", "sql")
    service = spawner.service(backend, SHORT_RETRIES)
    with Api(service.url) as api:
        # A receiver asking to be retried in 10**30 seconds: recorded, and given up.
        asks_forever = api.submit(queue=queue, webhook={"url": hostile_receiver})
        expect(api.cancel(asks_forever["id"]), 200)
        delivery = _wait_delivery(api, asks_forever["id"], "failed")
        [attempt] = delivery["attempts"]
        assert attempt["status_code"] == 503, attempt

        # A host that does not resolve: each attempt is recorded, until the window closes.
        unresolved = api.submit(queue=queue, webhook={"url": "http://celeriac-test.invalid/"})
        expect(api.cancel(unresolved["id"]), 200)
        delivery = _wait_delivery(api, unresolved["id"], "failed")
        assert len(delivery["attempts"]) >= 2, delivery
        assert all(a["error"] and a["status_code"] is None for a in delivery["attempts"])

        # A URL written straight into SQL (as before URLs were checked) that cannot be
        # parsed: one recorded attempt, refused for good, no retries and no traceback.
        job = api.submit(queue=queue, delay=600, webhook={"url": "http://example.com/"})
        engine = sa.create_engine(backend.database_url)
        with engine.begin() as connection:
            connection.execute(
                sa.update(JOBS_TABLE)
                .where(JOBS_TABLE.c.id == job["id"])
                .values(webhook={"url": "http://0177.0.0.1/", "events": ["cancelled"]})
            )
        engine.dispose()
        expect(api.cancel(job["id"]), 200)
        delivery = _wait_delivery(api, job["id"], "failed")
        [attempt] = delivery["attempts"]
        assert "canonical dotted quad" in attempt["error"], attempt
        api.submit(queue=queue)  # the service still takes jobs
    log = service.log(200_000)
    assert "Traceback" not in log, log


def test_bad_queue_default_webhook_stops_start_up(spawner: Spawner) -> None:
    backend = spawner.backend("sqlite", "sql")
    defaults = {"hooked": {"url": "http://a..b/"}}
    process = spawner.process(
        service_command(0),
        "bad-defaults",
        {**backend.env(), "CELERIAC_WEBHOOK_QUEUE_DEFAULTS": json.dumps(defaults)},
    )
    assert process.proc.wait(30) != 0
    assert "empty label" in process.log(), process.log()


def test_limits_reach_the_contract(api: Api) -> None:
    """The served OpenAPI document carries the limits, so clients and fuzzers see them."""
    schemas = expect(api.http.get("/openapi.json"), 200)["components"]["schemas"]
    pid = schemas["WorkerRegister"]["properties"]["pid"]
    assert (pid["minimum"], pid["maximum"], pid["type"]) == (1, 2**31 - 1, "integer")
    assert "pattern" in schemas["WorkerRegister"]["properties"]["hostname"]
    assert "pattern" in schemas["WebhookSpec"]["properties"]["url"]
