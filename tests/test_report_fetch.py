"""Issue 14: fewer hops per job.

- Report-and-fetch: ``POST /leases/report`` with ``next`` settles the reports, then leases
  the worker's next jobs in the same call (docs/protocol.md). Driven with curl, as any
  worker would, over the whole backend matrix: fencing, idempotent reports, a refused
  ``next`` that settles nothing.
- A ``?wait=`` answered from the settle (same process) and from another replica (NOTIFY,
  pub/sub, or the shared poll): both render exactly what ``GET /jobs/{id}`` renders.
- The Python worker's turn-taking between its leaser and a report's ``next``."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from celeriac.worker import Slots
from conftest import Api, Service, Spawner, expect, unavailable
from support.backends import SELECTED_BACKENDS

pytestmark = pytest.mark.timeout(90)


def curl(url: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    """POST ``body`` with curl: the status and the JSON answer."""
    if shutil.which("curl") is None:
        unavailable("curl is not installed")
    done = subprocess.run(
        ["curl", "-sS", "-X", "POST", f"{url}{path}", "-H", "content-type: application/json",
         "-d", json.dumps(body), "-w", "\n%{http_code}"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    text, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(text)


def next_body(queue: str, max_jobs: int, **extra: Any) -> dict[str, Any]:
    return {"worker": "curl-worker", "queues": [queue], "max_jobs": max_jobs, "wait": 0, **extra}


def succeeded(job: dict[str, Any], result: Any) -> dict[str, Any]:
    token = job["lease"]["token"]
    return {"id": job["id"], "token": token, "outcome": "succeeded", "result": result}


def test_a_report_fetches_the_next_jobs_in_the_same_call(
    service: Service, api: Api, queue: str
) -> None:
    ids = [api.submit(task="t.rf", args=[i], queue=queue)["id"] for i in range(3)]
    status, leased = curl(service.url, "/leases", next_body(queue, 1))
    assert status == 200 and [job["id"] for job in leased["jobs"]] == ids[:1], leased
    first = leased["jobs"][0]

    body = {"reports": [succeeded(first, "one")], "next": next_body(queue, 5)}
    status, answer = curl(service.url, "/leases/report", body)
    assert status == 200, answer
    assert answer["reports"] == [{"id": ids[0], "ok": True, "status": "succeeded", "detail": None}]
    assert sorted(job["id"] for job in answer["jobs"]) == sorted(ids[1:])
    assert all(job["lease"]["token"] and job["attempt"] == 1 for job in answer["jobs"])
    assert api.get(ids[0])["result"] == "one"
    assert {api.get(i)["status"] for i in ids[1:]} == {"running"}

    # The same report again (its answer was lost, say) changes nothing; the next one
    # settles; nothing is left to fetch.
    second, third = sorted(answer["jobs"], key=lambda job: job["id"])
    body = {"reports": [succeeded(first, "again"), succeeded(second, "two")],
            "next": next_body(queue, 1)}  # fmt: skip
    status, answer = curl(service.url, "/leases/report", body)
    assert status == 200, answer
    outcomes = [(r["ok"], r["detail"]) for r in answer["reports"]]
    assert outcomes == [(False, "stale-lease"), (True, None)]
    assert answer["jobs"] == []
    assert (api.get(ids[0])["result"], api.get(ids[1])["result"]) == ("one", "two")

    # A ``next`` the service refuses refuses the whole call: the report is not settled.
    over = next_body(queue, 1_000_000)
    status, problem = curl(service.url, "/leases/report", {"reports": [succeeded(third, 3)],
                                                          "next": over})  # fmt: skip
    assert status == 422 and "max_jobs" in problem["detail"], problem
    assert api.get(third["id"])["status"] == "running"
    # Without ``next``: the answer is as it always was (no ``jobs``).
    status, answer = curl(service.url, "/leases/report", {"reports": [succeeded(third, 3)]})
    assert status == 200 and "jobs" not in answer and answer["reports"][0]["ok"], answer


def test_a_report_from_a_stale_lease_fetches_but_changes_nothing(
    service: Service, api: Api, queue: str
) -> None:
    job_id = api.submit(task="t.rf", queue=queue)["id"]
    first = api.lease_one(queue, lease_seconds=0.2)
    again = api.lease_one(queue, wait=10)  # reclaimed once the lease ran out
    assert again["lease"]["token"] != first["lease"]["token"]
    late = api.submit(task="t.rf", queue=queue)["id"]
    body = {"reports": [succeeded(first, "stale")], "next": next_body(queue, 1)}
    status, answer = curl(service.url, "/leases/report", body)
    assert status == 200 and answer["reports"][0]["ok"] is False, answer
    assert [job["id"] for job in answer["jobs"]] == [late]
    job = api.get(job_id)
    assert (job["status"], job["result"]) == ("running", None)
    assert expect(api.complete(again, "fresh"), 200)["result"] == "fresh"


POSTGRES = ("postgres-sql", "postgres-redis")
POSTGRES_BROKERS = [b.split("-")[1] for b in SELECTED_BACKENDS if b in POSTGRES]


@pytest.mark.parametrize("broker", POSTGRES_BROKERS or ["sql"])
def test_a_waiter_on_another_replica_is_woken_and_reads_the_job(
    spawner: Spawner, broker: str
) -> None:
    if not POSTGRES_BROKERS:
        pytest.skip("needs a postgres backend (CELERIAC_TEST_BACKENDS)")
    waiting_on, settling_on = spawner.replicas(spawner.backend("postgres", broker), 2)
    queue = "q_replicas"
    with Api(waiting_on.url) as here, Api(settling_on.url) as there:
        job_id = here.submit(task="t.rf", queue=queue)["id"]
        started = threading.Event()

        def wait() -> dict[str, Any]:
            started.set()
            return here.get(job_id, wait=30)

        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(wait)
            started.wait(10)
            leased = there.lease_one(queue)
            expect(there.complete(leased, {"big": "x" * 100}), 200)
            job = answer.result(timeout=30)
        assert (job["status"], job["result"]) == ("succeeded", {"big": "x" * 100})
        assert job == here.get(job_id) == there.get(job_id)


def test_a_waiter_on_the_settling_replica_gets_exactly_the_job(api: Api, queue: str) -> None:
    """Answered from the settle itself (no read back): the same body as a read."""
    job_id = api.submit(task="t.rf", queue=queue, max_retries=0)["id"]
    with ThreadPoolExecutor(2) as pool:
        waits = [pool.submit(api.get, job_id, 30) for _ in range(2)]
        leased = api.lease_one(queue)
        expect(api.fail(leased, "Boom", "it broke"), 200)
        answers = [w.result(timeout=30) for w in waits]
    assert answers[0]["status"] == "failed" and answers[0]["error"]["type"] == "Boom"
    assert answers[0] == answers[1] == api.get(job_id)


def test_the_leaser_and_a_reports_next_take_turns() -> None:
    slots = Slots(total=2, prefetch=2)
    stopping, quiet = threading.Event(), threading.Event()
    assert slots.wait_room(stopping, quiet) == 4  # the leaser asks for 4
    assert slots.take_turn() == 0  # a report may not ask meanwhile
    slots.done_asking()
    assert slots.take_turn() == 4  # now it may, and the leaser waits for it
    leaser = threading.Thread(target=slots.wait_room, args=(stopping, quiet))
    leaser.start()
    leaser.join(0.2)
    assert leaser.is_alive()
    slots.done_asking()
    leaser.join(5)
    assert not leaser.is_alive() and slots.asking
