"""Issue 16, item 4: bulk actions by filter (``POST /jobs/bulk``), ``celeriac jobs
retry|cancel|delete`` with filters and ``celeriac queues purge``.

Each action goes through the one-job commands' rules in batches of 1000: retried jobs are
published (a waiting worker gets them), a running job is asked to stop rather than
cancelled, only finished jobs are deleted; a filter the action cannot apply to is a 422."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Api, Backend, Service, Spawner, assert_problem, child_env, expect


def bulk(api: Api, action: str, **filter: Any) -> dict[str, int]:
    answer: dict[str, int] = expect(
        api.http.post("/jobs/bulk", json={"action": action, "filter": filter}), 200
    )
    return answer


def failed_jobs(api: Api, queue: str, count: int) -> list[str]:
    jobs = api.submit_batch([{"queue": queue, "max_retries": 0} for _ in range(count)])
    leased = api.lease(queue, count, wait=5)
    assert len(leased) == count
    reports = [
        {"id": job["id"], "token": job["lease"]["token"], "outcome": "failed",
         "error": {"type": "Boom", "message": "no"}}
        for job in leased
    ]  # fmt: skip
    expect(api.http.post("/leases/report", json={"reports": reports}), 200)
    return [job["id"] for job in jobs]


def test_bulk_retry_cancel_delete(api: Api, queue: str) -> None:
    ids = failed_jobs(api, queue, 3)
    waiting = api.submit(queue=queue, delay=3600)  # scheduled: not retryable, cancellable
    assert bulk(api, "retry", status="failed", queue=queue) == {"matched": 3, "changed": 3}
    assert {api.get(job_id)["status"] for job_id in ids} == {"queued"}
    # Published like a submit: a lease gets them (from the broker's index or SQL).
    running = api.lease(queue, 3, wait=5)
    assert sorted(job["id"] for job in running) == sorted(ids)
    assert all(job["attempt"] == 1 for job in running)
    # Cancel: the scheduled one now; the running ones are asked to stop.
    assert bulk(api, "cancel", queue=queue) == {"matched": 4, "changed": 4}
    assert api.get(waiting["id"])["status"] == "cancelled"
    beat = expect(api.heartbeat(running[0]), 200)
    assert beat["cancel_requested"] is True
    # Asked again: matched, but nothing changes.
    assert bulk(api, "cancel", queue=queue, status="running") == {"matched": 3, "changed": 0}
    # Delete: finished jobs only (the running ones stay).
    assert bulk(api, "delete", queue=queue) == {"matched": 1, "changed": 1}
    assert_problem(api.http.get(f"/jobs/{waiting['id']}"), 404, "job-not-found")
    assert api.get(ids[0])["status"] == "running"


@pytest.mark.first_backend_only
def test_bulk_walks_every_batch(api: Api, queue: str) -> None:
    """2,500 matching jobs: three batches of the keyset walk, none lost or counted twice."""
    for _ in range(3):
        api.submit_batch([{"queue": queue} for _ in range(1000 if _ < 2 else 500)])
    assert bulk(api, "cancel", queue=queue, status=["queued"]) == {
        "matched": 2500,
        "changed": 2500,
    }
    assert api.queue_counts(queue) == {"cancelled": 2500}
    assert bulk(api, "delete", queue=queue, finished_before="2100-01-01T00:00:00Z") == {
        "matched": 2500,
        "changed": 2500,
    }
    assert api.queue_counts(queue) == {}


@pytest.mark.first_backend_only
def test_bulk_refuses_what_cannot_apply(api: Api, queue: str) -> None:
    job = api.submit(queue=queue)
    for action, filter, word in [
        ("retry", {}, "at least one"),
        ("retry", {"status": "succeeded"}, "retry applies to"),
        ("delete", {"status": "queued", "queue": queue}, "delete applies to"),
        ("cancel", {"finished_before": "2100-01-01T00:00:00Z"}, "finished_before"),
        ("cancel", {"status": [], "queue": queue}, "at least one status"),
        ("cancel", {"queue": queue, "colour": "red"}, None),
        ("purge", {"queue": queue}, None),
        ("cancel", {"ids": ["x" * 36] * 1001}, None),
    ]:
        answer = api.http.post("/jobs/bulk", json={"action": action, "filter": filter})
        problem = assert_problem(answer, 422)
        if word is not None:
            assert word in problem["detail"], problem
    assert api.get(job["id"])["status"] == "queued"  # nothing changed


def _cli(service: Service, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = child_env({"CELERIAC_SERVER_URL": service.url})
    return subprocess.run(
        [sys.executable, "-m", "celeriac", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent,
    )


@pytest.mark.first_backend_only
def test_cli_bulk_and_purge(service: Service, api: Api, queue: str) -> None:
    ids = failed_jobs(api, queue, 2)
    done = _cli(service, "jobs", "retry", "--status", "failed", "--queue", queue)
    assert done.returncode == 0, done.stderr
    assert '"changed": 2' in done.stdout
    assert {api.get(job_id)["status"] for job_id in ids} == {"queued"}
    # purge asks first; "n" leaves everything as it was.
    refused = _cli(service, "queues", "purge", queue, stdin="n\n")
    assert refused.returncode != 0
    assert api.queue_counts(queue) == {"queued": 2}
    purged = _cli(service, "queues", "purge", queue, "--yes")
    assert purged.returncode == 0, purged.stderr
    assert '"changed": 2' in purged.stdout
    assert api.queue_counts(queue) == {"cancelled": 2}
    deleted = _cli(service, "jobs", "delete", "--queue", queue, "--finished-before", "0s")
    assert deleted.returncode == 0, deleted.stderr
    assert api.queue_counts(queue) == {}
    neither = _cli(service, "jobs", "delete")
    assert neither.returncode != 0 and "job id" in neither.stderr


@pytest.mark.first_backend_only
def test_keys_act_only_on_their_queues(backend: Backend, spawner: Spawner) -> None:
    """Bulk actions need the admin scope, and a key restricted to some queues changes (and
    counts) only jobs of those; its events stream cannot ask for another queue."""
    admin, mine, reader = (prefix + secrets.token_hex(16) for prefix in ("adm-", "kt-", "rd-"))
    keyed = spawner.service(
        backend, {"CELERIAC_API_KEYS": f"{admin}:admin,{mine}:admin@kt_*,{reader}:read"}
    )
    suffix = secrets.token_hex(4)
    with (
        Api(keyed.url, headers={"Authorization": f"Bearer {admin}"}) as everyone,
        Api(keyed.url, headers={"Authorization": f"Bearer {mine}"}) as restricted,
        Api(keyed.url, headers={"Authorization": f"Bearer {reader}"}) as read_only,
    ):
        everyone.submit_batch([{"queue": f"kt_{suffix}"}, {"queue": f"other_{suffix}"}])
        answer = read_only.http.post("/jobs/bulk", json={"action": "cancel", "filter": {}})
        assert_problem(answer, 403)
        answer = restricted.http.post(
            "/jobs/bulk", json={"action": "cancel", "filter": {"queue": f"other_{suffix}"}}
        )
        assert_problem(answer, 403)
        assert bulk(restricted, "cancel", status="queued") == {"matched": 1, "changed": 1}
        assert everyone.queue_counts(f"other_{suffix}") == {"queued": 1}
        assert everyone.queue_counts(f"kt_{suffix}") == {"cancelled": 1}
        refused = restricted.http.get("/events", params={"queue": f"other_{suffix}"})
        assert_problem(refused, 403)
