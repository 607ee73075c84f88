"""RabbitMQ as the dispatch broker (issue 9), against a real RabbitMQ and real processes:
the message format, priorities, long-polls woken by a delivery, a queue deleted by hand,
RabbitMQ restarted mid-run, a direct AMQP worker killed mid-job, and the Node.js AMQP
worker completing jobs submitted with curl. (The shared suite also runs on
``postgres-amqp``: see conftest.py.)

RabbitMQ runs on 127.0.0.1:5672 (guest/guest); the module gets a vhost of its own
(``rabbitmqctl``, as root) and one service. Without RabbitMQ these tests skip locally and
fail under CI=true; the restart test needs ``rabbitmqctl`` as root."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel
from conftest import (
    REPO,
    Api,
    Backend,
    Process,
    Service,
    Spawner,
    expect,
    rabbitmqctl,
    unavailable,
)

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")

PYTHON_WORKER = REPO / "examples" / "amqp_worker" / "worker.py"
NODE_WORKER = REPO / "workers" / "node" / "amqp.js"


# --- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def backend(module_spawner: Spawner) -> Backend:
    return module_spawner.backend("sqlite", "amqp")


@pytest.fixture(scope="module")
def service(module_spawner: Spawner, backend: Backend) -> Service:
    return module_spawner.service(backend)


@pytest.fixture
def api(service: Service) -> Iterator[Api]:
    with Api(service.url) as client:
        yield client


def on_rabbitmq(backend: Backend, work: Callable[[AbstractChannel], Awaitable[T]]) -> T:
    """Run ``work`` on a channel of our own, in the backend's vhost."""

    async def run() -> T:
        connection = await aio_pika.connect(backend.broker_url)
        async with connection:
            return await work(await connection.channel())

    return asyncio.run(run())


def queue_name(backend: Backend, queue: str) -> str:
    return f"{backend.redis_prefix}.{queue}"  # CELERIAC_AMQP_PREFIX = the backend's prefix


def ready_messages(backend: Backend, queue: str) -> int:
    async def count(channel: AbstractChannel) -> int:
        try:
            declared = await channel.declare_queue(queue_name(backend, queue), passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            # Not declared yet: the service declares a queue as it publishes the first of
            # its jobs, after their commit, so a look right after a submit may come first.
            return 0
        return int(declared.declaration_result.message_count or 0)

    return on_rabbitmq(backend, count)


def drain(api: Api, queue: str, count: int, timeout: float = 30.0) -> list[str]:
    """Lease and complete ``count`` jobs over HTTP; every job must be leased once."""
    done: list[str] = []
    deadline = time.monotonic() + timeout
    while len(done) < count:
        assert time.monotonic() < deadline, f"only {len(done)} of {count} jobs leased"
        leased = api.lease(queue, max_jobs=100, wait=1, lease_seconds=30)
        reports = [
            {"id": j["id"], "token": j["lease"]["token"], "outcome": "succeeded"} for j in leased
        ]
        if reports:
            answer = expect(api.http.post("/leases/report", json={"reports": reports}), 200)
            assert all(item["ok"] for item in answer["reports"]), answer
        done += [j["id"] for j in leased]
    assert len(done) == len(set(done)), "a job was leased twice"
    return done


def submit_many(api: Api, queue: str, count: int) -> list[str]:
    ids: list[str] = []
    for start in range(0, count, 500):
        size = min(500, count - start)
        ids += [job["id"] for job in api.submit_batch([{"queue": queue}] * size)]
    return ids


def amqp_worker_env(service: Service, backend: Backend, queue: str, **extra: str) -> dict[str, str]:
    return {
        "CELERIAC_SERVER_URL": service.url,
        "CELERIAC_AMQP_URL": backend.broker_url,
        "CELERIAC_AMQP_PREFIX": backend.redis_prefix,
        "CELERIAC_QUEUES": queue,
        **extra,
    }


# --- the message format and dispatch order ---------------------------------------------


def test_one_persistent_message_per_job_carrying_its_id(
    api: Api, backend: Backend, queue: str
) -> None:
    low = api.submit(queue=queue, priority=0)
    high = api.submit(queue=queue, priority=9)
    api.wait_for(lambda: ready_messages(backend, queue) == 2, what="two messages")

    async def peek(channel: AbstractChannel) -> dict[str, Any]:
        amqp_queue = await channel.get_queue(queue_name(backend, queue))
        message = await amqp_queue.get(no_ack=False)
        seen = {
            "body": message.body.decode(),
            "headers": dict(message.headers),
            "priority": message.priority,
            "persistent": message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT,
        }
        await message.nack(requeue=True)
        return seen

    # The highest priority is at the head of the queue.
    assert on_rabbitmq(backend, peek) == {
        "body": high["id"],
        "headers": {"queue": queue, "priority": 9},
        "priority": 9,
        "persistent": True,
    }
    assert [job["id"] for job in api.lease(queue, max_jobs=2, wait=1)] == [high["id"], low["id"]]
    # Leased: SQL holds the lease, the messages are acked.
    assert ready_messages(backend, queue) == 0


def test_priorities_are_honoured(api: Api, queue: str) -> None:
    specs = [{"queue": queue, "task": f"p{i % 10}-{i}", "priority": i % 10} for i in range(40)]
    api.submit_batch(specs)
    expected = sorted(specs, key=lambda s: -s["priority"])  # stable: oldest first within
    first = [job["task"] for job in api.lease(queue, max_jobs=3, wait=1)]
    assert first == [s["task"] for s in expected[:3]]
    rest = [job["task"] for job in api.lease(queue, max_jobs=37, wait=1)]  # a bulk consume
    assert rest == [s["task"] for s in expected[3:]]


def test_a_long_poll_wakes_on_the_delivery(api: Api, service: Service, queue: str) -> None:
    got: list[list[dict[str, Any]]] = []

    def poll() -> None:
        with Api(service.url) as client:
            started = time.monotonic()
            got.append(client.lease(queue, max_jobs=5, wait=20))
            got.append([{"elapsed": time.monotonic() - started}])

    waiter = threading.Thread(target=poll)
    waiter.start()
    time.sleep(0.7)  # the lease is waiting on a consumer by now
    job = api.submit(queue=queue)
    waiter.join(25)
    assert [j["id"] for j in got[0]] == [job["id"]]
    assert got[1][0]["elapsed"] < 5, got[1]


def test_claim_by_id(api: Api, queue: str) -> None:
    job = api.submit(queue=queue)
    body = {"worker": "direct", "ids": [job["id"], "no-such-job"], "lease_seconds": 30}
    claimed = expect(api.http.post("/leases/claim", json=body), 200)["jobs"]
    assert [j["id"] for j in claimed] == [job["id"]]
    assert claimed[0]["attempt"] == 1 and claimed[0]["lease"]["token"]
    assert api.get(job["id"])["worker"] == "direct"
    # Leased now: a second claim (a duplicate message) gets nothing.
    assert expect(api.http.post("/leases/claim", json=body), 200) == {"jobs": []}
    expect(api.complete(claimed[0], "done"), 200)


# --- RabbitMQ losing things --------------------------------------------------------------


def test_a_queue_deleted_by_hand_is_republished_from_sql(
    api: Api, backend: Backend, service: Service, queue: str
) -> None:
    ids = submit_many(api, queue, 300)
    api.wait_for(lambda: ready_messages(backend, queue) == 300, what="300 messages")

    async def delete(channel: AbstractChannel) -> None:
        await channel.queue_delete(queue_name(backend, queue))

    on_rabbitmq(backend, delete)
    assert sorted(drain(api, queue, 300)) == sorted(ids)
    assert api.queue_counts(queue) == {"succeeded": 300}
    assert "republishing" in service.log(20000)


def test_rabbitmq_restarted_mid_run(api: Api, backend: Backend, queue: str) -> None:
    if shutil.which("rabbitmqctl") is None or os.geteuid() != 0:
        pytest.skip("needs rabbitmqctl as root to stop and start the RabbitMQ application")
    before = submit_many(api, queue, 200)
    rabbitmqctl("stop_app")
    try:
        ready = api.http.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["checks"]["broker"].startswith("unavailable")
        # Meanwhile SQL is the record and the dispatcher: submits and leases go on.
        during = submit_many(api, queue, 100)
        leased = api.lease(queue, max_jobs=10, wait=0.5, lease_seconds=30)
        assert len(leased) == 10
    finally:
        rabbitmqctl("start_app")
        # Its listeners may open after start_app returns (seen on a loaded machine): the
        # next test's workers connect at once.
        rabbitmqctl("await_startup", "--timeout", "30")
    api.wait_for(
        lambda: api.http.get("/readyz").status_code == 200,
        timeout=30,
        what="the service to reconnect to RabbitMQ by itself",
    )
    for job in leased:
        expect(api.complete(job), 200)
    rest = drain(api, queue, 290)
    assert sorted(rest + [j["id"] for j in leased]) == sorted(before + during)
    assert api.queue_counts(queue) == {"succeeded": 300}


# --- direct AMQP workers -----------------------------------------------------------------


def test_direct_worker_killed_mid_job_is_redelivered_and_completed(
    api: Api, service: Service, backend: Backend, spawner: Spawner, queue: str
) -> None:
    def worker(name: str) -> Process:
        env = amqp_worker_env(
            service,
            backend,
            queue,
            CELERIAC_WORKER_NAME=name,
            CELERIAC_LEASE_SECONDS="2",
            CELERIAC_CONCURRENCY="2",
        )
        return spawner.process([sys.executable, str(PYTHON_WORKER)], name, env)

    doomed = worker("doomed")
    job = api.submit(queue=queue, task="demo.crash_drill", args=["kill-test"])
    running = api.wait_for(
        lambda j: j["status"] != "queued",
        timeout=20,
        job_id=job["id"],
        what="the direct worker to claim the job",
    )
    assert running["status"] == "running" and running["worker"] == "doomed", doomed.log()
    # Its heartbeats keep the 2 s lease alive while it lives.
    assert api.get(job["id"], wait=2.5)["status"] == "running", doomed.log()
    doomed.kill()

    survivor = worker("survivor")
    final = api.wait_finished(job["id"], timeout=30)
    assert final["status"] == "succeeded", f"{final}\n{survivor.log()}"
    assert final["result"] == "kill-test: done on attempt 2"
    assert final["worker"] == "survivor" and final["attempt"] == 2
    assert survivor.stop() == 0, survivor.log()


def curl_submit(url: str, **job: Any) -> dict[str, Any]:
    done = subprocess.run(
        ["curl", "-sS", "--fail-with-body", "-X", "POST", f"{url}/jobs",
         "-H", "content-type: application/json", "-d", json.dumps(job)],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    body: dict[str, Any] = json.loads(done.stdout)
    return body


def test_node_amqp_worker_completes_jobs_submitted_with_curl(
    api: Api, service: Service, backend: Backend, spawner: Spawner, queue: str
) -> None:
    node = shutil.which("node")
    if node is None or shutil.which("curl") is None:
        unavailable("node (20+) and curl are needed for the Node.js AMQP worker")
    if not (REPO / "workers" / "node" / "node_modules" / "amqplib").is_dir():
        unavailable("workers/node/node_modules lacks amqplib: run `npm ci` in workers/node")
    env = amqp_worker_env(service, backend, queue, CELERIAC_CONCURRENCY="4")
    worker = spawner.process([node or "node", str(NODE_WORKER)], "node-amqp", env)
    jobs = [
        curl_submit(service.url, task="math.add", args=[2, 3], queue=queue),
        curl_submit(service.url, task="text.shout", args=["hi"], queue=queue, priority=5),
        curl_submit(service.url, task="no.such.task", queue=queue),
    ]
    finals = [api.wait_finished(job["id"], timeout=20) for job in jobs]
    assert [f["status"] for f in finals] == ["succeeded", "succeeded", "failed"], worker.log()
    assert [f["result"] for f in finals[:2]] == [5, "HI!"]
    assert finals[2]["error"]["type"] == "UnknownTask"
    assert all(f["worker"].startswith("node-amqp-") for f in finals)
    assert worker.stop() == 0, worker.log()
