"""The Node.js reference worker (workers/node) against a real service: jobs submitted with
curl, crash recovery after SIGKILL, fencing of stale tokens, warm and cold shutdown, a
mixed fleet with the Python worker, and the drain benchmark. Real processes, no mocks.

Needs ``node`` (20+) and ``workers/node/node_modules`` (``make test`` runs ``npm ci``);
without them these tests are skipped locally and fail under CI=true."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Api, Process, Service, Spawner, child_env, unavailable

NODE = shutil.which("node")
NODE_DIR = REPO / "workers" / "node"
SCRIPTS = REPO / "tests" / "node"  # small ES modules driving the library
BENCH = REPO / "bench" / "node_http.js"


@pytest.fixture(scope="module", autouse=True)
def node_ready() -> None:
    if NODE is None:
        unavailable("node is not installed: the Node.js worker tests need Node 20+")
    version = subprocess.run([NODE, "--version"], capture_output=True, text=True, check=True)
    if int(version.stdout.strip().lstrip("v").split(".")[0]) < 20:
        unavailable(f"the Node.js worker needs Node 20+, found {version.stdout.strip()}")
    if not (NODE_DIR / "node_modules").is_dir():
        unavailable("workers/node/node_modules is missing: run `make test` or `npm ci` there")
    if shutil.which("curl") is None:
        unavailable("curl is not installed")


@pytest.fixture(scope="module")
def node_service(module_spawner: Spawner) -> Service:
    """One SQLite service for the module, with the suite's short timers (2 s default
    lease, reclaim within 0.3 s); tests isolate themselves by queue."""
    return module_spawner.service()


@pytest.fixture
def http(node_service: Service) -> Iterator[Api]:
    with Api(node_service.url) as client:
        yield client


def start_node_worker(
    spawner: Spawner, url: str, queue: str, *, concurrency: int = 4, **env: str
) -> Process:
    settings = {
        "CELERIAC_SERVER_URL": url,
        "CELERIAC_QUEUES": queue,
        "CELERIAC_CONCURRENCY": str(concurrency),
        "CELERIAC_POLL_WAIT": "1",
        **env,
    }
    return spawner.process([NODE or "node", str(NODE_DIR / "worker.js")], "node-worker", settings)


def curl_submit(url: str, **job: Any) -> dict[str, Any]:
    done = subprocess.run(
        ["curl", "-sS", "--fail-with-body", "-X", "POST", f"{url}/jobs",
         "-H", "Content-Type: application/json", "-d", json.dumps(job)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    body: dict[str, Any] = json.loads(done.stdout)
    assert body["status"] == "queued", body
    return body


def run_node(script: str, env: Mapping[str, str], cwd: Path, timeout: float = 60) -> Any:
    """Run tests/node/<script>, which prints one JSON line; return it parsed."""
    done = subprocess.run(
        [NODE or "node", str(SCRIPTS / script)],
        env=child_env(env), cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, f"node exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def wait_running(http: Api, job_id: str, timeout: float = 15) -> dict[str, Any]:
    job: dict[str, Any] = http.wait_for(
        lambda j: j["status"] == "running", timeout, job_id=job_id, what=f"{job_id} to run"
    )
    return job


def wait_executing(http: Api, job_id: str, timeout: float = 15) -> dict[str, Any]:
    """Running in the worker's hands, not only granted: ``running`` is the status from the
    grant's commit on, before the worker has the answer. ``demo.slow`` reports progress as
    it starts, and the worker's next heartbeat brings it. A signal sent in between finds
    no job running: the worker hands the grant back and stops at once."""
    job: dict[str, Any] = http.wait_for(
        lambda j: j["status"] == "running" and j["progress"] is not None,
        timeout, job_id=job_id, what=f"{job_id} to be running in the worker",
    )  # fmt: skip
    return job


def wait_exit(process: Process, timeout: float = 20) -> int:
    try:
        return process.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"worker still running after {timeout}s:\n{process.log()}") from None


def test_jobs_submitted_with_curl_run_on_the_node_worker(
    spawner: Spawner, node_service: Service, http: Api, queue: str
) -> None:
    worker = start_node_worker(spawner, node_service.url, queue)
    url = node_service.url
    add = curl_submit(url, task="math.add", args=[2, 3], queue=queue)
    shout = curl_submit(url, task="text.shout", args=["hello"], queue=queue)
    fails = curl_submit(url, task="demo.fail", args=["bad input"], queue=queue)
    unknown = curl_submit(url, task="no.such.task", queue=queue)
    backoff = {"base": 0.1, "max": 0.2, "jitter": False}
    flaky = curl_submit(url, task="demo.flaky", args=[2], queue=queue, retry_backoff=backoff)
    # A 1.5 s lease: heartbeats every 0.5 s carry the progress.
    slow = curl_submit(url, task="demo.slow", args=[1.2, 4], queue=queue, timeout=1.5)

    done = {name: http.wait_finished(job["id"], timeout=20) for name, job in
            [("add", add), ("shout", shout), ("fails", fails), ("unknown", unknown),
             ("flaky", flaky), ("slow", slow)]}  # fmt: skip
    assert (done["add"]["status"], done["add"]["result"]) == ("succeeded", 5), worker.log()
    assert done["add"]["attempt"] == 1
    assert done["add"]["worker"].startswith(f"node-{worker.pid}@")
    assert done["shout"]["result"] == "HELLO!"
    assert done["fails"]["status"] == "failed"
    assert done["fails"]["attempt"] == 1  # retry: false
    assert done["fails"]["error"]["type"] == "DemoFailure"
    assert done["fails"]["error"]["message"] == "bad input"
    assert "worker.js" in done["fails"]["error"]["traceback"]
    assert done["unknown"]["status"] == "failed"
    assert done["unknown"]["error"]["type"] == "UnknownTask"
    assert (done["flaky"]["status"], done["flaky"]["attempt"]) == ("succeeded", 2)
    assert done["flaky"]["result"] == "succeeded on attempt 2"
    assert done["slow"]["result"] == "slept 1.2s"
    assert done["slow"]["progress"]["total"] == 4
    assert done["slow"]["progress"]["message"] == "working"


def test_a_cancel_request_stops_a_running_node_job(
    spawner: Spawner, node_service: Service, http: Api, queue: str
) -> None:
    start_node_worker(spawner, node_service.url, queue)
    job = http.submit(task="demo.slow", args=[30, 30], queue=queue, timeout=1.5)
    wait_running(http, job["id"])
    started = time.monotonic()
    assert http.cancel(job["id"]).json()["cancel_requested"] is True
    done = http.wait_finished(job["id"], timeout=10)
    assert done["status"] == "cancelled"
    assert done["error"]["type"] == "Cancelled"
    assert time.monotonic() - started < 5  # the next heartbeat (0.5 s) told the worker


def test_a_job_whose_worker_is_killed_runs_again_after_its_lease(
    spawner: Spawner, node_service: Service, http: Api, queue: str
) -> None:
    first = start_node_worker(spawner, node_service.url, queue, concurrency=1)
    # timeout=1: the lease lasts 1 s unless extended; the worker beats every 1/3 s.
    job = http.submit(task="demo.slow", args=[2, 4], queue=queue, timeout=1, max_retries=2)
    running = wait_running(http, job["id"])
    assert running["worker"].startswith(f"node-{first.pid}@")
    time.sleep(1.2)  # it survives beyond its first lease thanks to the heartbeats
    assert http.get(job["id"])["status"] == "running"
    first.kill()  # SIGKILL mid-job: no release, no report

    second = start_node_worker(spawner, node_service.url, queue, concurrency=1)
    done = http.wait_finished(job["id"], timeout=30)
    assert done["status"] == "succeeded", second.log()
    assert done["result"] == "slept 2s"
    assert done["attempt"] == 2  # the killed run counts
    assert done["worker"].startswith(f"node-{second.pid}@")


def test_a_stale_token_is_refused_and_changes_nothing(
    node_service: Service, http: Api, queue: str, tmp_path: Path
) -> None:
    job = http.submit(task="node.stale", queue=queue, max_retries=3)
    env = {"CELERIAC_SERVER_URL": node_service.url, "TEST_QUEUE": queue}
    out = run_node("stale_token.mjs", env, tmp_path)
    assert out["sameJob"] and out["tokensDiffer"], out
    assert out["complete"] == {"status": 409, "type": "urn:celeriac:problem:stale-lease"}
    assert out["heartbeat"][0]["ok"] is False
    assert out["heartbeat"][0]["detail"] == "stale-lease"
    assert (out["report"][0]["ok"], out["report"][0]["detail"]) == (False, "stale-lease")
    assert (out["current"][0]["ok"], out["current"][0]["status"]) == (True, "succeeded")
    done = http.get(job["id"])
    assert (done["status"], done["result"], done["attempt"]) == ("succeeded", "current", 2)


def test_the_node_worker_drops_a_job_whose_lease_was_lost(
    node_service: Service, http: Api, queue: str, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    env = {
        "CELERIAC_SERVER_URL": node_service.url,
        "TEST_QUEUE": queue,
        "TEST_RELEASE_FILE": str(release),
    }
    node = subprocess.Popen(
        [NODE or "node", str(SCRIPTS / "lost_lease.mjs")],
        env=child_env(env), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        job = http.submit(task="node.block", queue=queue, max_retries=3)
        running = wait_running(http, job["id"])
        assert running["worker"].startswith("node-")
        # Its lease runs out (1 s, never extended); the service requeues the job, and
        # this test, another worker, takes it and finishes it.
        taken = http.lease_one(queue, wait=15, worker="python-test")
        assert taken["id"] == job["id"] and taken["attempt"] == 2
        assert http.complete(taken, "from python").status_code == 200
        release.touch()
        stdout, stderr = node.communicate(timeout=30)
    finally:
        if node.poll() is None:
            node.kill()
            node.communicate()
    assert node.returncode == 0, stderr
    out = json.loads(stdout.strip().splitlines()[-1])
    # The Node worker reported with its old token: refused, dropped, counted as lost.
    assert out["answers"] == [
        {"id": job["id"], "task": "node.block", "outcome": "succeeded", "ok": False,
         "status": None, "detail": "stale-lease"}
    ], out  # fmt: skip
    assert out["stats"]["lost"] == 1 and out["stats"]["succeeded"] == 0
    done = http.get(job["id"])
    assert (done["status"], done["result"], done["worker"]) == ("succeeded", "from python",
                                                                "python-test")  # fmt: skip


def test_sigterm_is_a_warm_shutdown(
    spawner: Spawner, node_service: Service, http: Api, queue: str
) -> None:
    worker = start_node_worker(spawner, node_service.url, queue)
    job = http.submit(task="demo.slow", args=[3, 6], queue=queue)
    wait_executing(http, job["id"])
    worker.proc.send_signal(signal.SIGTERM)
    assert wait_exit(worker) == 0, worker.log()
    done = http.get(job["id"])
    assert (done["status"], done["attempt"]) == ("succeeded", 1)  # finished, then left
    assert "warm shutdown" in worker.log()


def test_a_second_signal_is_a_cold_shutdown_that_releases(
    spawner: Spawner, node_service: Service, http: Api, queue: str
) -> None:
    worker = start_node_worker(spawner, node_service.url, queue)
    job = http.submit(task="demo.slow", args=[30, 30], queue=queue)
    wait_executing(http, job["id"])
    worker.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    worker.proc.send_signal(signal.SIGINT)
    assert wait_exit(worker) == 1, worker.log()
    released = http.get(job["id"])
    # Released: queued again at once, and the attempt is not counted.
    assert (released["status"], released["attempt"]) == ("queued", 0), worker.log()


FLEET_TASKS = """
import time

from celeriac import Celeriac

app = Celeriac("fleet")


@app.task(name="demo.sleep")
def sleep(seconds: float = 1) -> str:
    time.sleep(seconds)
    return f"slept {seconds}s"
"""


def test_a_mixed_fleet_shares_one_queue(
    spawner: Spawner, node_service: Service, http: Api, queue: str
) -> None:
    (spawner.workdir / "fleet_tasks.py").write_text(FLEET_TASKS)
    python_worker = spawner.process(
        [sys.executable, "-m", "celeriac", "worker", "--app", "fleet_tasks:app",
         "--queues", queue, "--concurrency", "4", "--poll-wait", "1", "--hostname", "py-fleet"],
        "python-worker",
        {"CELERIAC_SERVER_URL": node_service.url},
    )  # fmt: skip
    node_worker = start_node_worker(spawner, node_service.url, queue, concurrency=4)

    def both_up() -> bool:
        for process in (python_worker, node_worker):
            assert process.proc.poll() is None, process.log()
        return "queues" in python_worker.log() and "queues" in node_worker.log()

    http.wait_for(both_up, timeout=30, what="both workers to start")
    count = 80
    jobs = http.submit_batch([{"task": "demo.sleep", "args": [0.05], "queue": queue}] * count)
    done = [http.wait_finished(job["id"], timeout=60) for job in jobs]

    assert all(job["status"] == "succeeded" for job in done), [j["status"] for j in done]
    assert all(job["result"] == "slept 0.05s" for job in done)
    # Each job leased exactly once: no job ran on both workers, none ran twice.
    assert [job["attempt"] for job in done] == [1] * count
    assert len({job["id"] for job in done}) == count
    by_worker: dict[str, int] = {}
    for job in done:
        by_worker[job["worker"]] = by_worker.get(job["worker"], 0) + 1
    node_name = f"node-{node_worker.pid}@"
    assert by_worker.get("py-fleet", 0) > 0, by_worker
    assert sum(n for name, n in by_worker.items() if name.startswith(node_name)) > 0, by_worker
    assert sum(by_worker.values()) == count
    assert http.queue_counts(queue) == {"succeeded": count}


def test_a_result_the_service_refuses_fails_its_job_alone(
    spawner: Spawner, queue: str, tmp_path: Path
) -> None:
    small_limits = {"CELERIAC_RESULT_STORE": "none", "CELERIAC_MAX_PAYLOAD_BYTES": "4096"}
    service = spawner.service(extra=small_limits)
    client = spawner.api(service.url)
    big = client.submit(task="node.big", queue=queue)
    small = client.submit(task="node.small", queue=queue)
    env = {"CELERIAC_SERVER_URL": service.url, "TEST_QUEUE": queue}
    out = run_node("too_large.mjs", env, tmp_path)
    assert out["stats"]["succeeded"] == 1 and out["stats"]["failed"] == 1, out
    assert client.get(small["id"])["result"] == "ok"
    refused = client.get(big["id"])
    assert (refused["status"], refused["attempt"]) == ("failed", 1)
    assert refused["error"]["type"] == "ReportRejected"
    assert "413" in refused["error"]["message"]


def test_the_drain_benchmark_runs(node_service: Service, tmp_path: Path) -> None:
    done = subprocess.run(
        [NODE or "node", str(BENCH), "--server", node_service.url, "--jobs", "3000",
         "--concurrency", "500"],
        env=child_env({}), cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["refused"] == 0
    assert figures["stats"]["succeeded"] == figures["stats"]["leased"] == 3000
    assert figures["drain_jobs_per_s"] > 0


@pytest.fixture(scope="module")
def redis_backed(module_spawner: Spawner) -> tuple[Service, dict[str, str]]:
    """A service on the Redis broker, and the settings a Node Redis worker needs."""
    backend = module_spawner.backend("sqlite", "redis")
    worker_env = {
        "CELERIAC_BROKER_URL": backend.broker_url,
        "CELERIAC_REDIS_PREFIX": backend.redis_prefix,
    }
    return module_spawner.service(backend), worker_env


def test_jobs_submitted_with_curl_run_on_the_node_redis_worker(
    redis_backed: tuple[Service, dict[str, str]], spawner: Spawner
) -> None:
    """The Redis worker protocol from a client none of our Python touches: leases, a
    failure retried by the service, results reaching SQL through the event stream."""
    service, worker_env = redis_backed
    queue = "node_redis"
    adds = [curl_submit(service.url, task="math.add", args=[i, i], queue=queue) for i in range(20)]
    flaky = curl_submit(
        service.url,
        task="demo.flaky",
        args=[2],
        queue=queue,
        retry_backoff={"base": 0.2, "jitter": False},
    )
    start_node_worker(spawner, service.url, queue, **worker_env)
    with Api(service.url) as api:
        for i, job in enumerate(adds):
            done = api.wait_for(
                lambda j: j["status"] == "succeeded", 20, job_id=job["id"], what="an add"
            )
            assert done["result"] == 2 * i
            assert done["attempt"] == 1
        done = api.wait_for(
            lambda j: j["status"] == "succeeded", 20, job_id=flaky["id"], what="the retry"
        )
        assert done["attempt"] == 2


def test_a_stale_token_is_refused_over_redis(
    redis_backed: tuple[Service, dict[str, str]],
) -> None:
    """A Redis lease that lapses is reclaimed by the service (SQL decides); the old token
    then answers STALE and changes nothing."""
    service, worker_env = redis_backed
    queue = "node_redis_stale"
    job = curl_submit(service.url, task="math.add", args=[1, 2], queue=queue, max_retries=3)
    env = {
        "REDIS_URL": worker_env["CELERIAC_BROKER_URL"],
        "TAG": "{" + worker_env["CELERIAC_REDIS_PREFIX"] + "}",
        "QUEUE": queue,
    }
    leased = run_node("redis_stale.mjs", {**env, "MODE": "lease"}, NODE_DIR)
    assert leased["id"] == job["id"]
    with Api(service.url) as api:
        api.wait_for(
            lambda j: j["status"] == "queued" and j["attempt"] == 1,
            20,
            job_id=job["id"],
            what="the lapsed Redis lease reclaimed",
        )
        late = {"MODE": "complete", "JOB_ID": job["id"], "TOKEN": leased["lease"]["token"]}
        answer = run_node("redis_stale.mjs", {**env, **late}, NODE_DIR)
        assert answer.get("error", "").startswith("STALE"), answer
        assert api.get(job["id"])["status"] == "queued"
