"""The Python worker's Redis transport end to end: a real service with
CELERIAC_BROKER_URL=redis://… (its own key prefix, deleted afterwards; never a FLUSHDB), a
real ``celeriac worker --broker redis://…`` leasing straight from Redis, and the results
read back from SQL through GET /jobs/{id}."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import REDIS_HOST, REDIS_PORT, Api, Backend, Process, Service, Spawner, expect

TASKS = """
from celeriac import Celeriac, current_job

app = Celeriac("rw")

@app.task(name="rw.add")
def add(x: int, y: int) -> int:
    return x + y

@app.task(name="rw.broken")
def broken() -> None:
    raise ValueError("broken on purpose")

@app.task(name="rw.mark")
def mark(path: str, text: str) -> None:
    with open(path, "a") as out:
        out.write(text + "\\n")

@app.task(name="rw.until_cancelled")
async def until_cancelled() -> str:
    import asyncio
    current_job.report_progress(1, 2, "waiting")
    await asyncio.sleep(60)
    return "unreachable"
"""


@pytest.fixture(scope="module")
def redis_backend(module_spawner: Spawner) -> Backend:
    return module_spawner.backend("sqlite", "redis")


@pytest.fixture(scope="module")
def service(module_spawner: Spawner, redis_backend: Backend) -> Service:
    (module_spawner.workdir / "rw_tasks.py").write_text(TASKS)
    return module_spawner.service(redis_backend)


@pytest.fixture(scope="module")
def api(service: Service) -> Iterator[Api]:
    with Api(service.url) as client:
        yield client


@pytest.fixture(scope="module")
def redis_worker(module_spawner: Spawner, service: Service, redis_backend: Backend) -> Process:
    command = [sys.executable, "-m", "celeriac", "worker", "-A", "rw_tasks:app", "-Q", "q_rw",
               "-c", "4", "--server", service.url, "--broker", redis_backend.broker_url,
               "--redis-prefix", redis_backend.redis_prefix, "--poll-wait", "1"]  # fmt: skip
    return module_spawner.process(command, "redis-worker")


def test_jobs_run_over_redis_and_land_in_sql(api: Api, redis_worker: Process) -> None:
    job = api.submit(task="rw.add", args=[2, 3], queue="q_rw")
    done = api.wait_finished(job["id"], 30)
    assert done["status"] == "succeeded" and done["result"] == 5, done
    assert done["worker"] and done["attempt"] == 1
    failed = api.wait_finished(api.submit(task="rw.broken", queue="q_rw", max_retries=0)["id"], 30)
    assert failed["status"] == "failed" and failed["error"]["type"] == "ValueError", failed
    # A burst: leased in batches (one FCALL for as many as there are free slots).
    burst = api.submit_batch(
        [{"task": "rw.add", "args": [i, i], "queue": "q_rw"} for i in range(50)]
    )
    assert [api.wait_finished(j["id"], 30)["result"] for j in burst] == [2 * i for i in range(50)]
    # The worker registers over HTTP whatever its transport.
    workers = expect(api.http.get("/workers"), 200)["workers"]
    assert any(w["pid"] == redis_worker.pid and w["status"] == "online" for w in workers)


def test_progress_and_cancel_over_redis(api: Api, redis_worker: Process) -> None:
    # A 1.5 s lease: Redis heartbeats (carrying progress) every half second.
    job = api.submit(task="rw.until_cancelled", queue="q_rw", timeout=1.5)
    running = api.wait_for(lambda j: j["progress"], 20, job_id=job["id"], what="progress")
    assert running["progress"] == {"current": 1, "total": 2, "message": "waiting"}
    expect(api.cancel(job["id"]), 200)
    assert api.wait_finished(job["id"], 20)["status"] == "cancelled"


def test_a_job_cancelled_while_queued_never_runs_on_a_redis_worker(
    api: Api, module_spawner: Spawner, service: Service, redis_backend: Backend, tmp_path: Any
) -> None:
    """Cancelling a queued job takes it out of what Redis workers can lease: a worker
    started afterwards runs the job behind it, never the cancelled one."""
    marks = tmp_path / "marks.txt"
    queue = "q_rw_cancel"
    cancelled = api.submit(task="rw.mark", args=[str(marks), "cancelled"], queue=queue)
    expect(api.cancel(cancelled["id"]), 200)
    after = api.submit(task="rw.mark", args=[str(marks), "after"], queue=queue)
    command = [sys.executable, "-m", "celeriac", "worker", "-A", "rw_tasks:app", "-Q", queue,
               "-c", "1", "--server", service.url, "--broker", redis_backend.broker_url,
               "--redis-prefix", redis_backend.redis_prefix, "--poll-wait", "1"]  # fmt: skip
    worker = module_spawner.process(command, "redis-worker-cancel")
    try:
        finished = api.wait_finished(after["id"], 30)
    except AssertionError as exc:
        ran = marks.read_text() if marks.exists() else "(nothing)"
        raise AssertionError(f"{exc}\nran: {ran}\nworker log:\n{worker.log()}") from None
    finally:
        worker.stop()
    assert finished["status"] == "succeeded", finished
    assert marks.read_text().split() == ["after"]
    assert api.get(cancelled["id"])["status"] == "cancelled"


def test_stale_token_is_refused(api: Api, service: Service, redis_backend: Backend) -> None:
    from celeriac._execution import Report
    from celeriac._transport import BeatItem
    from celeriac._transport_redis import RedisTransport

    transport = RedisTransport(
        f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_backend.redis_db}",
        prefix=redis_backend.redis_prefix, worker="test-stale", queues=["q_stale"],
        lease_seconds=10, poll_wait=2,
    )  # fmt: skip
    try:
        job = api.submit(task="rw.add", args=[1, 1], queue="q_stale")
        grants: list[Any] = []
        deadline = time.monotonic() + 20
        while not grants and time.monotonic() < deadline:
            grants = transport.lease(5)  # blocks in BLPOP until the service wakes it
        [grant] = grants
        assert grant.job["id"] == job["id"]
        stale = grant.token + "x"
        [beat] = transport.heartbeat([BeatItem(job["id"], stale, None, 10)])
        assert not beat.ok
        [refused] = transport.report([Report(job["id"], stale, "succeeded", "99")])
        assert not refused.ok and refused.detail == "stale-lease"
        [ok] = transport.report([Report(job["id"], grant.token, "succeeded", "2")])
        assert ok.ok
        [again] = transport.report([Report(job["id"], grant.token, "succeeded", "3")])
        assert not again.ok  # settled: the token is stale now
    finally:
        transport.close()
    done = api.wait_finished(job["id"], 20)
    assert done["status"] == "succeeded" and done["result"] == 2, done


def test_an_idle_worker_leaves_at_once_despite_its_long_poll(
    module_spawner: Spawner, service: Service, redis_backend: Backend
) -> None:
    """SIGTERM ends the BLPOP in flight (by a wake key of the worker's own) rather than
    sitting out the 30 s poll wait."""
    command = [sys.executable, "-m", "celeriac", "worker", "-A", "rw_tasks:app", "-Q", "q_idle",
               "--server", service.url, "--broker", redis_backend.broker_url,
               "--redis-prefix", redis_backend.redis_prefix, "--poll-wait", "30",
               "-l", "info"]  # fmt: skip
    worker = module_spawner.process(command, "idle-redis-worker")
    deadline = time.monotonic() + 20
    while "redis transport" not in worker.log() and time.monotonic() < deadline:
        time.sleep(0.05)  # the log line is the only sign that it is up and waiting
    time.sleep(0.3)  # into its BLPOP
    started = time.monotonic()
    assert worker.stop(timeout=20) == 0, worker.log()
    assert time.monotonic() - started < 5, worker.log()
