"""Bad input: every refusal is its 4xx application/problem+json (type, title, status,
detail) and changes nothing. Validation does not depend on the backend, so this runs on
sqlite-sql only, on services of its own: one with small limits (so the 413 cases stay
fast) and one with API keys."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Api, Service, Spawner, assert_problem, child_env, expect

pytestmark = pytest.mark.timeout(60)

MAX_PAYLOAD = 1024
MAX_BATCH = 100
RESULT_MAX = 4096  # keeps the service's request-body limit small, too
HUGE = 2 * 1024 * 1024  # over any request-body limit these settings can give
# Keys must be at least 24 characters (service.auth.MIN_KEY_LENGTH).
S1, R1, W1, A1 = (f"{name}-test-key-0123456789abcdef" for name in ("s1", "r1", "w1", "a1"))
KEYS = {S1: "submit", R1: "read", W1: "work", A1: "admin"}


@pytest.fixture(scope="module")
def limited(module_spawner: Spawner) -> Service:
    return module_spawner.service(
        extra={
            "CELERIAC_MAX_PAYLOAD_BYTES": str(MAX_PAYLOAD),
            "CELERIAC_MAX_BATCH_JOBS": str(MAX_BATCH),
            "CELERIAC_RESULT_MAX_BYTES": str(RESULT_MAX),
            # No result store: a result over the payload limit is refused.
            "CELERIAC_RESULT_STORE": "none",
        }
    )


@pytest.fixture
def api(limited: Service) -> Iterator[Api]:
    with Api(limited.url) as client:
        yield client


@pytest.fixture
def queue() -> str:
    return f"q_{uuid.uuid4().hex[:8]}"


class Unchanged:
    """Asserts that the block did not add, remove or change any job."""

    def __init__(self, api: Api) -> None:
        self.api = api

    def snapshot(self) -> list[dict[str, Any]]:
        return list(self.api.list_jobs(limit=500)["jobs"])

    def __enter__(self) -> Unchanged:
        self.before = self.snapshot()
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            assert self.snapshot() == self.before, "a refused request changed the jobs table"


# --- submit ---------------------------------------------------------------------------


def test_invalid_json(api: Api) -> None:
    with Unchanged(api):
        for path in ("/jobs", "/jobs/batch", "/leases", "/leases/report", "/leases/heartbeat"):
            response = api.http.post(
                path, content=b'{"task": "t", ', headers={"content-type": "application/json"}
            )
            assert_problem(response, 400, "invalid-json")


def test_body_that_is_not_json_typed(api: Api) -> None:
    with Unchanged(api):
        for content_type in ("text/plain", "application/x-www-form-urlencoded"):
            response = api.http.post(
                "/jobs", content=b'{"task": "t"}', headers={"content-type": content_type}
            )
            assert_problem(response, 415, "unsupported-media-type")


@pytest.mark.parametrize(
    ("body", "where"),
    [
        pytest.param({}, "task", id="no-task"),
        pytest.param({"task": 5}, "task", id="task-not-a-string"),
        pytest.param({"task": "t", "args": "x"}, "args", id="args-not-a-list"),
        pytest.param({"task": "t", "args": {"a": 1}}, "args", id="args-an-object"),
        pytest.param({"task": "t", "kwargs": [1]}, "kwargs", id="kwargs-a-list"),
        pytest.param({"task": "t", "priority": "high"}, "priority", id="priority-a-string"),
        pytest.param({"task": "t", "priority": 1.5}, "priority", id="priority-fractional"),
        pytest.param({"task": "t", "priority": -1}, "priority", id="priority-below-0"),
        pytest.param({"task": "t", "priority": 10}, "priority", id="priority-above-9"),
        pytest.param({"task": "t", "max_retries": -1}, "max_retries", id="max-retries-negative"),
        pytest.param({"task": "t", "delay": -1}, "delay", id="delay-negative"),
        pytest.param({"task": "t", "timeout": 0}, "timeout", id="timeout-zero"),
        pytest.param({"task": "t", "run_at": "tomorrow"}, "run_at", id="run-at-garbage"),
        pytest.param({"task": "t", "run_at": "2030-01-01T00:00:00"}, "run_at", id="run-at-naive"),
        pytest.param({"task": "t", "expires_at": 5.5e20}, "expires_at", id="expires-at-huge"),
        pytest.param(
            {"task": "t", "retry_backoff": {"base": -1}}, "retry_backoff", id="backoff-negative"
        ),
        pytest.param(
            {"task": "t", "retry_backoff": {"bsae": 1}}, "retry_backoff", id="backoff-unknown"
        ),
        pytest.param({"task": "t", "surprise": 1}, "surprise", id="unknown-field"),
        pytest.param({"task": "t", "Queue": "q"}, "Queue", id="unknown-field-case"),
        pytest.param({"task": ""}, "task", id="task-empty"),
        pytest.param({"task": "has space"}, "task", id="task-with-space"),
        pytest.param({"task": "t/x"}, "task", id="task-with-slash"),
        pytest.param({"task": "tâche"}, "task", id="task-non-ascii"),
        pytest.param({"task": "t" * 129}, "task", id="task-too-long"),
        pytest.param({"task": "t", "queue": ""}, "queue", id="queue-empty"),
        pytest.param({"task": "t", "queue": "a b"}, "queue", id="queue-with-space"),
        pytest.param({"task": "t", "queue": "q" * 129}, "queue", id="queue-too-long"),
        pytest.param(["not", "an", "object"], "body", id="body-a-list"),
    ],
)
def test_submit_validation(api: Api, body: Any, where: str) -> None:
    with Unchanged(api):
        problem = assert_problem(api.http.post("/jobs", json=body), 422, "validation-failed")
    assert where in problem["detail"]
    assert problem["errors"], problem
    assert all({"location", "message", "type"} <= set(e) for e in problem["errors"])


def test_names_at_the_limits_are_accepted(api: Api) -> None:
    job = api.submit(task="a.B-c_d:9" + "x" * 119, queue="Q" * 128)
    assert len(job["task"]) == 128 and len(job["queue"]) == 128


def test_delay_and_run_at_together(api: Api) -> None:
    with Unchanged(api):
        response = api.http.post(
            "/jobs", json={"task": "t", "delay": 5, "run_at": "2030-01-01T00:00:00Z"}
        )
        problem = assert_problem(response, 422, "validation-failed")
    assert "delay" in problem["detail"] and "run_at" in problem["detail"]


def test_args_over_the_payload_limit(api: Api) -> None:
    with Unchanged(api):
        big = {"task": "t", "args": ["x" * MAX_PAYLOAD]}
        problem = assert_problem(api.http.post("/jobs", json=big), 413, "payload-too-large")
        assert str(MAX_PAYLOAD) in problem["detail"]
        split = {"task": "t", "args": ["x" * 600], "kwargs": {"k": "y" * 600}}
        assert_problem(api.http.post("/jobs", json=split), 413, "payload-too-large")
    # Just under the limit is fine: the limit is on the args and kwargs, not the envelope.
    fits = "x" * (MAX_PAYLOAD - 10)
    api.submit(args=[fits], queue="q_fits", priority=1, max_retries=0)


def test_body_over_the_request_limit(api: Api) -> None:
    with Unchanged(api):
        huge = {"task": "t", "args": ["x" * HUGE]}
        assert_problem(api.http.post("/jobs", json=huge), 413, "payload-too-large")
        assert_problem(api.http.post("/jobs/batch", json={"jobs": [huge]}), 413)


def test_chunked_body_over_the_request_limit(api: Api) -> None:
    """Without a Content-Length the limit is enforced while reading: still a 413."""
    body = b'{"task": "t", "args": ["' + b"x" * HUGE + b'"]}'

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    with Unchanged(api):
        response = api.http.post(
            "/jobs", content=chunks(), headers={"content-type": "application/json"}
        )
        assert "content-length" not in response.request.headers
        assert_problem(response, 413, "payload-too-large")


def test_batch_over_the_job_limit(api: Api, queue: str) -> None:
    with Unchanged(api):
        jobs = [{"task": "t", "queue": queue} for _ in range(MAX_BATCH + 1)]
        problem = assert_problem(
            api.http.post("/jobs/batch", json={"jobs": jobs}), 413, "payload-too-large"
        )
        assert str(MAX_BATCH) in problem["detail"]
        assert_problem(api.http.post("/jobs/batch", json={"jobs": []}), 422, "validation-failed")
        assert_problem(api.http.post("/jobs/batch", json={}), 422, "validation-failed")
        assert_problem(api.http.post("/jobs/batch", json={"jobs": {}}), 422, "validation-failed")
    assert len(api.submit_batch([{"queue": queue}] * MAX_BATCH)) == MAX_BATCH


def test_batch_with_one_job_over_the_payload_limit(api: Api, queue: str) -> None:
    with Unchanged(api):
        jobs: list[dict[str, Any]] = [{"task": "t", "queue": queue} for _ in range(3)]
        jobs[1]["args"] = ["x" * MAX_PAYLOAD]
        problem = assert_problem(
            api.http.post("/jobs/batch", json={"jobs": jobs}), 413, "payload-too-large"
        )
        assert "jobs[1]" in problem["detail"]


def test_batch_whole_request_may_be_max_batch_jobs_times_the_limit(api: Api, queue: str) -> None:
    """docs/api.md: "the limit applies per job's args+kwargs, and the request as a whole
    may be max_batch_jobs x that". max_batch_jobs jobs just under the limit each."""
    fits = "x" * (MAX_PAYLOAD - 100)
    jobs = [{"task": "t", "queue": queue, "args": [fits]} for _ in range(MAX_BATCH)]
    assert len(api.submit_batch(jobs)) == MAX_BATCH


def test_idempotency_key_too_long(api: Api) -> None:
    with Unchanged(api):
        response = api.http.post(
            "/jobs", json={"task": "t"}, headers={"Idempotency-Key": "k" * 256}
        )
        assert_problem(response, 422, "validation-failed")


# --- leases -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "where"),
    [
        pytest.param({"worker": "w", "wait": 31}, "wait", id="wait-over-30"),
        pytest.param({"worker": "w", "wait": -1}, "wait", id="wait-negative"),
        pytest.param({"worker": "w", "max_jobs": 1001}, "max_jobs", id="max-jobs-over-1000"),
        pytest.param({"worker": "w", "max_jobs": 0}, "max_jobs", id="max-jobs-zero"),
        pytest.param({"worker": "w", "lease_seconds": 0}, "lease_seconds", id="lease-zero"),
        pytest.param({"worker": "w", "lease_seconds": 3601}, "lease_seconds", id="lease-too-long"),
        pytest.param({"worker": "w", "queues": []}, "queues", id="no-queues"),
        pytest.param({"worker": "w", "queues": ["bad queue"]}, "queues", id="bad-queue"),
        pytest.param({"worker": "w", "queues": "default"}, "queues", id="queues-a-string"),
        pytest.param({"worker": ""}, "worker", id="worker-empty"),
        pytest.param({}, "worker", id="no-worker"),
        pytest.param({"worker": "w", "extra": True}, "extra", id="unknown-field"),
    ],
)
def test_lease_validation(api: Api, queue: str, body: dict[str, Any], where: str) -> None:
    job = api.submit(queue=queue)
    if "queues" not in body:
        body = {**body, "queues": [queue]}
    problem = assert_problem(api.http.post("/leases", json=body), 422, "validation-failed")
    assert where in problem["detail"]
    assert api.get(job["id"]) == job, "a refused lease must not take the job"


def test_unknown_job_ids(api: Api) -> None:
    with Unchanged(api):
        for job_id in (str(uuid.uuid4()), "01890000-0000-7000-8000-000000000000"):
            assert_problem(api.http.get(f"/jobs/{job_id}"), 404, "job-not-found")
            assert_problem(api.http.get(f"/jobs/{job_id}", params={"wait": 1}), 404)
            assert_problem(api.cancel(job_id), 404, "job-not-found")
            assert_problem(api.retry(job_id), 404, "job-not-found")
            fake = {"id": job_id, "lease": {"token": "t"}}
            assert_problem(api.complete(fake, 1), 404, "job-not-found")
            assert_problem(api.fail(fake), 404, "job-not-found")
            assert_problem(api.release(fake), 404, "job-not-found")
            assert_problem(api.heartbeat(fake), 404, "job-not-found")


@pytest.mark.parametrize("job_id", ["not-a-uuid", "1234", "x" * 36, "%20"])
def test_malformed_job_ids(api: Api, job_id: str) -> None:
    with Unchanged(api):
        assert_problem(api.http.get(f"/jobs/{job_id}"), 404)
        assert_problem(api.cancel(job_id), 404)
        assert_problem(api.retry(job_id), 404)
        assert_problem(api.complete({"id": job_id, "lease": {"token": "t"}}, 1), 404)


def test_stale_and_wrong_tokens(api: Api, queue: str) -> None:
    job = api.submit(queue=queue)
    leased = api.lease_one(queue)
    wrong = {"id": leased["id"], "lease": {"token": "not-the-token"}}
    running = api.get(job["id"])
    for response in (
        api.complete(wrong, 1),
        api.fail(wrong),
        api.release(wrong),
        api.heartbeat(wrong),
    ):
        assert_problem(response, 409, "stale-lease")
    assert api.get(job["id"]) == running
    expect(api.complete(leased, "ok"), 200)
    done = api.get(job["id"])
    for response in (api.complete(leased, 2), api.fail(leased), api.release(leased)):
        assert_problem(response, 409, "stale-lease")
    assert api.get(job["id"]) == done


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({}, id="no-token"),
        pytest.param({"token": ""}, id="empty-token"),
        pytest.param({"token": "t" * 65}, id="token-too-long"),
        pytest.param({"token": 5}, id="token-not-a-string"),
    ],
)
def test_worker_call_validation(api: Api, queue: str, body: dict[str, Any]) -> None:
    job = api.submit(queue=queue)
    leased = api.lease_one(queue)
    running = api.get(job["id"])
    for action in ("complete", "release", "heartbeat"):
        response = api.http.post(f"/jobs/{leased['id']}/{action}", json=body)
        assert_problem(response, 422, "validation-failed")
    assert api.get(job["id"]) == running


def test_fail_validation(api: Api, queue: str) -> None:
    job = api.submit(queue=queue)
    leased = api.lease_one(queue)
    token = leased["lease"]["token"]
    running = api.get(job["id"])
    for body in (
        {"token": token},
        {"token": token, "error": {}},
        {"token": token, "error": {"type": ""}},
        {"token": token, "error": {"type": "E", "mesage": "typo"}},
        {"token": token, "error": {"type": "E"}, "retry_in": -1},
        {"token": token, "error": "boom"},
    ):
        response = api.http.post(f"/jobs/{leased['id']}/fail", json=body)
        assert_problem(response, 422, "validation-failed")
    assert api.get(job["id"]) == running


def test_result_over_the_payload_limit(api: Api, queue: str) -> None:
    job = api.submit(queue=queue)
    leased = api.lease_one(queue)
    running = api.get(job["id"])
    assert_problem(api.complete(leased, "x" * MAX_PAYLOAD), 413, "payload-too-large")
    report = {"id": leased["id"], "token": leased["lease"]["token"], "outcome": "succeeded"}
    response = api.http.post(
        "/leases/report", json={"reports": [{**report, "result": "x" * MAX_PAYLOAD}]}
    )
    assert_problem(response, 413, "payload-too-large")
    assert api.get(job["id"]) == running
    expect(api.complete(leased, "small"), 200)


def test_batch_calls_validation(api: Api, queue: str) -> None:
    jobs = api.submit_batch([{"queue": queue}, {"queue": queue}])
    a, b = api.lease(queue, max_jobs=2)
    before = [api.get(job["id"]) for job in jobs]
    ok = {"id": a["id"], "token": a["lease"]["token"], "outcome": "succeeded", "result": 1}
    # One bad report refuses the whole batch: the good one is not applied either.
    for bad in (
        {"id": b["id"], "token": b["lease"]["token"], "outcome": "failed"},  # no error
        {"id": b["id"], "token": b["lease"]["token"], "outcome": "exploded"},
        {"id": b["id"], "token": b["lease"]["token"], "outcome": "succeeded", "x": 1},
    ):
        response = api.http.post("/leases/report", json={"reports": [ok, bad]})
        assert_problem(response, 422, "validation-failed")
    assert_problem(api.http.post("/leases/report", json={"reports": []}), 422)
    assert_problem(api.http.post("/leases/heartbeat", json={"leases": []}), 422)
    response = api.http.post("/leases/heartbeat", json={"leases": [{"id": a["id"]}]})  # no token
    assert_problem(response, 422, "validation-failed")
    assert [api.get(job["id"]) for job in jobs] == before


# --- reads ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"limit": 0}, id="limit-zero"),
        pytest.param({"limit": 501}, id="limit-over-500"),
        pytest.param({"limit": "many"}, id="limit-not-a-number"),
        pytest.param({"status": "sleeping"}, id="unknown-status"),
    ],
)
def test_list_validation(api: Api, params: dict[str, Any]) -> None:
    assert_problem(api.http.get("/jobs", params=params), 422, "validation-failed")


def test_bad_cursor(api: Api) -> None:
    for cursor in ("not-a-cursor", "AAAA", "=" * 8):
        assert_problem(api.http.get("/jobs", params={"cursor": cursor}), 400, "invalid-cursor")


def test_result_wait_out_of_range(api: Api, queue: str) -> None:
    job = api.submit(queue=queue)
    for wait in (-1, 61, "soon"):
        response = api.http.get(f"/jobs/{job['id']}", params={"wait": wait})
        assert_problem(response, 422, "validation-failed")


def test_unknown_route_and_method(api: Api) -> None:
    assert_problem(api.http.get("/nope"), 404, "not-found")
    assert_problem(api.http.post("/v2/jobs", json={}), 404, "not-found")
    assert_problem(api.http.delete("/jobs"), 405, "method-not-allowed")
    assert_problem(api.http.put(f"/jobs/{uuid.uuid4()}", json={}), 405, "method-not-allowed")


# --- auth -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(module_spawner: Spawner) -> Service:
    keys = ",".join(f"{secret}:{scope}" for secret, scope in KEYS.items())
    return module_spawner.service(extra={"CELERIAC_API_KEYS": keys})


def key_headers(secret: str | None, header: str = "bearer") -> dict[str, str]:
    if secret is None:
        return {}
    if header == "bearer":
        return {"Authorization": f"Bearer {secret}"}
    return {"X-API-Key": secret}


# (method, path template, body, scope it needs)
ENDPOINTS: list[tuple[str, str, Any, str]] = [
    ("POST", "/jobs", {"task": "t", "queue": "q_auth"}, "submit"),
    ("POST", "/jobs/batch", {"jobs": [{"task": "t", "queue": "q_auth"}]}, "submit"),
    ("GET", "/jobs/{id}", None, "read"),
    ("GET", "/jobs", None, "read"),
    ("GET", "/queues", None, "read"),
    ("POST", "/leases", {"worker": "w", "queues": ["q_auth_none"]}, "work"),
    ("POST", "/jobs/{id}/heartbeat", {"token": "t"}, "work"),
    ("POST", "/jobs/{id}/complete", {"token": "t"}, "work"),
    ("POST", "/jobs/{id}/fail", {"token": "t", "error": {"type": "E"}}, "work"),
    ("POST", "/jobs/{id}/release", {"token": "t"}, "work"),
    ("POST", "/leases/heartbeat", {"leases": [{"id": "{id}", "token": "t"}]}, "work"),
    (
        "POST",
        "/leases/report",
        {"reports": [{"id": "{id}", "token": "t", "outcome": "released"}]},
        "work",
    ),
    ("POST", "/jobs/{id}/cancel", None, "admin"),
    ("POST", "/jobs/{id}/retry", None, "admin"),
]


@pytest.fixture(scope="module")
def guarded_api(guarded: Service) -> Iterator[Api]:
    """One client for every key: each request carries its own key header."""
    with Api(guarded.url) as client:
        yield client


@pytest.fixture(scope="module")
def guarded_job(guarded_api: Api) -> str:
    response = guarded_api.http.post(
        "/jobs", json={"task": "t", "queue": "q_auth_target"}, headers=key_headers(A1)
    )
    return str(expect(response, 202)["id"])


def call(
    api: Api, method: str, path: str, body: Any, job_id: str, headers: dict[str, str]
) -> httpx.Response:
    path = path.replace("{id}", job_id)
    if body is None:
        return api.http.request(method, path, headers=headers)
    text = json.dumps(body).replace("{id}", job_id)
    headers = {**headers, "content-type": "application/json"}
    return api.http.request(method, path, content=text, headers=headers)


@pytest.mark.parametrize(
    ("method", "path", "body", "scope"), ENDPOINTS, ids=[f"{m} {p}" for m, p, _, _ in ENDPOINTS]
)
def test_auth_scopes(
    guarded_api: Api, guarded_job: str, method: str, path: str, body: Any, scope: str
) -> None:
    admin = key_headers(A1)

    def total_jobs() -> int:
        queues = expect(guarded_api.http.get("/queues", headers=admin), 200)["queues"]
        return sum(sum(entry["counts"].values()) for entry in queues)

    def status() -> str:
        job = expect(guarded_api.http.get(f"/jobs/{guarded_job}", headers=admin), 200)
        return str(job["status"])

    before = total_jobs()
    for secret in (None, "wrong-key"):
        response = call(guarded_api, method, path, body, guarded_job, key_headers(secret))
        assert_problem(response, 401, "unauthorized")
    for secret, granted in KEYS.items():
        if granted not in (scope, "admin"):
            response = call(guarded_api, method, path, body, guarded_job, key_headers(secret))
            assert_problem(response, 403, "forbidden")
    assert total_jobs() == before, "a refused request created a job"
    assert status() == "queued", "a refused request changed the job"

    right = next(secret for secret, granted in KEYS.items() if granted == scope)
    for secret, header in ((right, "bearer"), (right, "x-api-key"), (A1, "bearer")):
        response = call(guarded_api, method, path, body, guarded_job, key_headers(secret, header))
        assert response.status_code not in (401, 403), response.text
        assert response.status_code < 500, response.text
    if path.endswith("/cancel"):  # put the shared job back for the other cases
        expect(guarded_api.http.post(f"/jobs/{guarded_job}/retry", headers=admin), 200)


def test_auth_health_needs_no_key(guarded_api: Api) -> None:
    assert expect(guarded_api.http.get("/healthz"), 200)["status"] == "ok"
    assert expect(guarded_api.http.get("/readyz"), 200)["status"] == "ok"
    assert_problem(guarded_api.http.get("/nope"), 404)


def test_auth_other_schemes_are_refused(guarded_api: Api) -> None:
    for headers in (
        {"Authorization": "Basic czE6"},
        {"Authorization": "Bearer"},
        {"Authorization": S1},
        {"X-API-Key": ""},
        {"Authorization": f"Bearer {A1}x"},
        {"Authorization": f"Bearer {A1.upper()}"},
    ):
        assert_problem(guarded_api.http.get("/queues", headers=headers), 401, "unauthorized")


# --- the CLI ------------------------------------------------------------------------------


def serve_exits(
    args: list[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celeriac", "serve", *args],
        env=child_env(env),
        cwd=cwd,  # not the repo: a developer's .env there must not apply
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_serve_refuses_a_public_address_without_keys(tmp_path: Path) -> None:
    env = {"CELERIAC_DATABASE_URL": f"sqlite:///{tmp_path}/never.db"}
    done = serve_exits(["--host", "0.0.0.0", "--port", "0", "--no-migrate"], env, tmp_path)
    assert done.returncode != 0, done
    assert "CELERIAC_API_KEYS" in done.stderr and "--insecure" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "never.db").exists()


def test_serve_refuses_bad_api_keys(tmp_path: Path) -> None:
    env = {
        "CELERIAC_DATABASE_URL": f"sqlite:///{tmp_path}/never.db",
        "CELERIAC_API_KEYS": "k1:submit+root",
    }
    done = serve_exits(["--port", "0", "--no-migrate"], env, tmp_path)
    assert done.returncode != 0, done
    assert "CELERIAC_API_KEYS" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
