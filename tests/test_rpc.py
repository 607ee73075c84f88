"""Issue 14: ``POST /jobs?wait=S`` submits a job and answers it once it finished (or S
seconds passed), so a caller gets a result in one call. Over the whole backend matrix,
with a real ``celeriac worker`` where a job must run."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celeriac import AsyncClient, Client
from conftest import Api, Service, Spawner, assert_problem, expect

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def worker(service: Service, spawner: Spawner, queue: str) -> Iterator[Any]:
    command = [
        sys.executable, "-m", "celeriac", "worker",
        "--app", "tasks_for_tests:app",
        "--server", service.url,
        "-c", "1", "-Q", queue, "-l", "warning",
        "--hostname", "rpc", "--poll-wait", "1",
    ]  # fmt: skip
    process = spawner.process(command, "rpc-worker")
    yield process
    assert process.stop() == 0, process.log()


def test_submit_wait_answers_the_result_in_one_call(api: Api, queue: str, worker: Any) -> None:
    spec = {"task": "tests.add", "args": [2, 3], "queue": queue}
    response = api.http.post("/jobs", params={"wait": 10}, json=spec)
    job = expect(response, 202)  # 202 for a new job, even one that already succeeded
    assert job["status"] == "succeeded", f"{job}\n{worker.log()}"
    assert job["result"] == 5
    assert response.headers["location"] == f"/jobs/{job['id']}"
    assert "retry-after" not in response.headers
    assert job == api.get(job["id"])  # exactly what GET /jobs/{id} answers


def test_the_clients_pass_the_wait_through(service: Service, queue: str, worker: Any) -> None:
    with Client(service.url, timeout=1.0) as client:  # the HTTP timeout gets the wait on top
        job = client.submit("tests.add", [1, 2], queue=queue, wait=10)
    assert (job["status"], job["result"]) == ("succeeded", 3), worker.log()

    async def submit_async() -> Any:
        async with AsyncClient(service.url, timeout=1.0) as client:
            return await client.submit("tests.add", [4, 5], queue=queue, wait=10)

    job = asyncio.run(submit_async())
    assert (job["status"], job["result"]) == ("succeeded", 9), worker.log()


def test_submit_wait_without_a_worker_answers_the_queued_job(api: Api, queue: str) -> None:
    started = time.monotonic()
    response = api.http.post("/jobs", params={"wait": 0.5}, json={"task": "t", "queue": queue})
    elapsed = time.monotonic() - started
    job = expect(response, 202)
    assert job["status"] == "queued"
    assert 0.45 <= elapsed < 2.5, elapsed
    assert api.get(job["id"])["status"] == "queued"  # committed


@pytest.mark.parametrize("wait", ["-1", "abc", "9999", "nan"])
def test_a_bad_wait_is_a_422_and_submits_nothing(api: Api, queue: str, wait: str) -> None:
    response = api.http.post("/jobs", params={"wait": wait}, json={"task": "t", "queue": queue})
    assert_problem(response, 422)
    assert api.list_jobs(queue=queue)["jobs"] == []


def test_a_keyed_replay_with_wait_answers_200_and_the_same_job(api: Api, queue: str) -> None:
    spec = {"task": "t", "queue": queue}
    headers = {"Idempotency-Key": f"rpc-{queue}"}
    first = expect(api.http.post("/jobs", params={"wait": 0.1}, json=spec, headers=headers), 202)
    again = api.http.post("/jobs", params={"wait": 0.1}, json=spec, headers=headers)
    assert expect(again, 200)["id"] == first["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == f"/jobs/{first['id']}"


def test_a_submit_over_the_long_poll_cap_is_committed_at_once(spawner: Spawner) -> None:
    service = spawner.service(extra={"CELERIAC_MAX_LONG_POLLS": "1"})
    api = spawner.api(service.url)
    held = api.submit(queue="held")

    def hold_the_slot() -> None:
        # A probe may hold the one slot when the holder arrives; a refused long-poll answers
        # at once with Retry-After, so the holder asks again until it is the one waiting.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            answer = api.http.get(f"/jobs/{held['id']}", params={"wait": 20})
            if "retry-after" not in answer.headers:
                return

    holder = threading.Thread(target=hold_the_slot)
    holder.start()
    try:
        # The barrier: a short probe refused with Retry-After proves the holder is counted.
        deadline = time.monotonic() + 15
        while "retry-after" not in api.http.get(f"/jobs/{held['id']}?wait=0.05").headers:
            assert time.monotonic() < deadline, "the holder never took the long-poll slot"
        started = time.monotonic()
        response = api.http.post("/jobs", params={"wait": 20}, json={"task": "t", "queue": "q"})
        assert time.monotonic() - started < 5
        job = expect(response, 202)
        assert job["status"] == "queued"
        assert response.headers["retry-after"]
        assert api.get(job["id"])["status"] == "queued"  # committed, not refused
    finally:
        expect(api.complete(api.lease_one("held"), None), 200)
        holder.join(30)
