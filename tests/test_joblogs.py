"""Issue 16, per-attempt job logs: what a task logs reaches ``GET /jobs/{id}/logs``, one
entry per attempt, bounded and truncated with a marker; any worker may send ``logs``
with its report (curl here, as a worker in another language would). On every backend,
with a real ``celeriac worker``."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import REDIS_HOST, REDIS_PORT, Api, Service, Spawner, assert_problem, expect

# The backends this feature's behaviour depends on (the suite stays under 15 minutes).
pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.only_backends("sqlite-sql", "postgres-redis", "mariadb-sql"),
]


@pytest.fixture
def worker(service: Service, spawner: Spawner, queue: str) -> Iterator[Any]:
    """Over HTTP; with the Redis broker, over the Redis worker protocol (logs ride the
    ``complete``/``fail`` calls there)."""
    command = [
        sys.executable, "-m", "celeriac", "worker",
        "--app", "tasks_for_tests:app",
        "--server", service.url,
        "-c", "2", "-Q", queue, "-l", "warning",
        "--hostname", "chatty", "--poll-wait", "1",
    ]  # fmt: skip
    backend = service.backend
    if backend is not None and backend.broker == "redis":
        redis_url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{backend.redis_db}"
        command += ["--broker", redis_url, "--redis-prefix", backend.redis_prefix]
    process = spawner.process(command, "chatty-worker")
    yield process
    assert process.stop() == 0, process.log()


def test_each_attempt_keeps_what_the_task_logged(api: Api, queue: str, worker: Any) -> None:
    spec = {"task": "tests.chatty", "args": [3, True], "queue": queue, "max_retries": 1}
    job = expect(api.http.post("/jobs", params={"wait": 20}, json=spec), 202)
    if job["status"] != "succeeded":  # the retry's backoff may outlast the first wait
        job = expect(api.http.get(f"/jobs/{job['id']}", params={"wait": 20}), 200)
    assert (job["status"], job["result"]) == ("succeeded", 2), worker.log()
    logs = expect(api.http.get(f"/jobs/{job['id']}/logs"), 200)
    assert logs["id"] == job["id"]
    first, second = logs["attempts"]
    assert (first["attempt"], first["outcome"]) == (1, "retrying")
    assert (second["attempt"], second["outcome"]) == (2, "succeeded")
    assert first["worker"] == second["worker"] and first["worker"].startswith("chatty")
    for entry in (first, second):
        lines = [line for line in entry["logs"].splitlines() if "tests.chatty: " in line]
        assert len(lines) == 3, entry["logs"]
        # Control characters arrive escaped, never refused with the whole report.
        assert f"attempt {entry['attempt']} line 0 \\x1b[31mred" in lines[0]
    # The failure the worker logged is part of the failed attempt's log.
    assert "RuntimeError" in first["logs"] and "first attempt fails" in first["logs"]


def test_a_long_log_is_cut_at_64_kib_with_a_marker(api: Api, queue: str, worker: Any) -> None:
    spec = {"task": "tests.chatty", "args": [2000, False], "queue": queue}
    job = expect(api.http.post("/jobs", params={"wait": 20}, json=spec), 202)
    assert job["status"] == "succeeded", worker.log()
    [entry] = expect(api.http.get(f"/jobs/{job['id']}/logs"), 200)["attempts"]
    text = entry["logs"]
    assert text.endswith("more bytes not kept]\n")
    kept = text[: text.rindex("\n[celeriac: log truncated")]
    assert 65536 - 200 < len(kept.encode()) <= 65536


def test_any_worker_may_send_logs_and_a_job_without_any_has_none(api: Api, queue: str) -> None:
    job = api.submit(task="t.plain", queue=queue)
    assert expect(api.http.get(f"/jobs/{job['id']}/logs"), 200)["attempts"] == []
    leased = expect(api.http.post("/leases", json={"worker": "sh-1", "queues": [queue]}), 200)
    [lease] = leased["jobs"]
    report = {"id": job["id"], "token": lease["lease"]["token"], "outcome": "succeeded",
              "result": 1, "logs": "step 1\nstep 2\n"}  # fmt: skip
    [item] = expect(api.http.post("/leases/report", json={"reports": [report]}), 200)["reports"]
    assert item["ok"], item
    [entry] = expect(api.http.get(f"/jobs/{job['id']}/logs"), 200)["attempts"]
    assert (entry["logs"], entry["worker"], entry["outcome"]) == ("step 1\nstep 2\n", "sh-1",
                                                                   "succeeded")  # fmt: skip


@pytest.mark.parametrize(
    ("logs", "status"),
    [
        ("x" * (65536 + 257), 422),  # over the limit
        ("bell \x07", 422),  # a control character other than tab, CR, LF
        (12, 422),  # not a string
        ("a\x00b", 400),  # NUL: refused by the gate, as anywhere in a body
    ],
)
def test_bad_logs_are_refused_and_settle_nothing(
    api: Api, queue: str, logs: Any, status: int
) -> None:
    job = api.submit(task="t.plain", queue=queue)
    leased = expect(api.http.post("/leases", json={"worker": "sh-2", "queues": [queue]}), 200)
    token = leased["jobs"][0]["lease"]["token"]
    body = {"token": token, "result": 1, "logs": logs}
    assert_problem(api.http.post(f"/jobs/{job['id']}/complete", json=body), status)
    assert api.get(job["id"])["status"] == "running"


def test_logs_of_a_missing_job_are_a_404(api: Api) -> None:
    assert_problem(api.http.get("/jobs/00000000-0000-4000-8000-000000000000/logs"), 404)
