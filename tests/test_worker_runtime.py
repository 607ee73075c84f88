"""The Python worker runtime end to end: pools, time limits and the worker registry, with
a real service (SQLite, short timers), real ``celeriac worker`` processes and plain HTTP.
No mocks: a crashed child is a SIGKILLed process, a lost worker a SIGKILLed worker."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Api, Process, Service, Spawner, expect

HEARTBEAT = 1.0  # the registry's interval here: a dead worker is lost after ~2 s

TASKS = """
import asyncio
import logging
import os
import threading
import time

from celeriac import Celeriac, SoftTimeLimitExceeded, current_job

app = Celeriac("rt")

@app.task(name="rt.add")
def add(x: int, y: int) -> int:
    return x + y

@app.task(name="rt.pid")
def pid() -> int:
    return os.getpid()

@app.task(name="rt.crash_once")
def crash_once() -> str:
    # Says where it runs (progress reaches GET /jobs/{id}), then waits to be killed.
    if current_job.attempt == 1:
        current_job.report_progress(os.getpid(), None, "pid")
        time.sleep(60)
    return f"survived on attempt {current_job.attempt}"

@app.task(name="rt.spin", time_limit=1.0)
def spin() -> None:
    while True:
        pass

@app.task(name="rt.soft", soft_time_limit=0.5)
def soft() -> str:
    try:
        for _ in range(3000):  # short sleeps: a thread is interrupted between them
            time.sleep(0.01)
    except SoftTimeLimitExceeded:
        return "soft limit caught"
    return "not interrupted"

@app.task(name="rt.asoft", soft_time_limit=0.5)
async def asoft() -> str:
    await asyncio.sleep(30)
    return "not interrupted"

@app.task(name="rt.amul")
async def amul(x: int, y: int) -> int:
    await asyncio.sleep(0.01)
    return x * y

@app.task(name="rt.window")
async def window() -> list[float]:
    started = time.time()
    await asyncio.sleep(0.5)
    return [started, time.time()]

@app.task(name="rt.thread")
def thread() -> str:
    return threading.current_thread().name

@app.task(name="rt.block")
def block(seconds: float) -> str:
    time.sleep(seconds)  # deaf to cancel requests
    return "blocked"

@app.task(name="rt.say")
def say(words: str) -> int:
    logging.getLogger("rt").warning("task says %s", words)
    return os.getpid()

@app.task(name="rt.sleep")
def sleep(seconds: float) -> str:
    current_job.wait_cancelled(seconds)
    return "slept"
"""


@pytest.fixture(scope="module")
def service(module_spawner: Spawner) -> Service:
    (module_spawner.workdir / "rt_tasks.py").write_text(TASKS)
    return module_spawner.service(extra={"CELERIAC_WORKER_HEARTBEAT_SECONDS": str(HEARTBEAT)})


@pytest.fixture(scope="module")
def api(service: Service) -> Iterator[Api]:
    with Api(service.url) as client:
        yield client


def worker(spawner: Spawner, service: Service, queue: str, *options: str) -> Process:
    (spawner.workdir / "rt_tasks.py").write_text(TASKS)  # the worker's cwd is importable
    command = [sys.executable, "-m", "celeriac", "worker", "-A", "rt_tasks:app", "-Q", queue,
               "--server", service.url, "--poll-wait", "1", "-l", "info", *options]  # fmt: skip
    return spawner.process(command, f"worker-{queue}")


@pytest.fixture(scope="module")
def processes(module_spawner: Spawner, service: Service) -> Process:
    return worker(module_spawner, service, "q_proc", "--pool", "processes", "-c", "2",
                  "--max-tasks-per-child", "3")  # fmt: skip


@pytest.fixture(scope="module")
def threads(module_spawner: Spawner, service: Service) -> Process:
    return worker(module_spawner, service, "q_thr", "-c", "2")


@pytest.fixture(scope="module")
def asyncio_pool(module_spawner: Spawner, service: Service) -> Process:
    return worker(module_spawner, service, "q_async", "--pool", "async", "-c", "10")


def run(api: Api, queue: str, task: str, *args: Any, timeout: float = 30, **job: Any) -> Any:
    submitted = api.submit(task=task, args=list(args), queue=queue, **job)
    return api.wait_finished(submitted["id"], timeout)


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll another process's state (nothing to block on) until ``check`` holds."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return value


def registered(api: Api, proc: Process) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        workers = expect(api.http.get("/workers"), 200)["workers"]
        return next((w for w in workers if w["pid"] == proc.pid), None)

    found: dict[str, Any] = wait_until(find, 30, f"worker {proc.pid} to register")
    return found


# --- processes ------------------------------------------------------------------------------


def test_processes_pool_runs_jobs_in_recycled_children(api: Api, processes: Process) -> None:
    assert run(api, "q_proc", "rt.add", 2, 3)["result"] == 5
    pids = [run(api, "q_proc", "rt.pid")["result"] for _ in range(7)]
    assert os.getpid() not in pids and processes.pid not in pids
    # --max-tasks-per-child 3: no child ran more than three of them.
    assert max(pids.count(pid) for pid in set(pids)) <= 3 and len(set(pids)) >= 3, pids


def test_killed_child_fails_its_job_which_is_retried(api: Api, processes: Process) -> None:
    # A 3 s lease: heartbeats (which carry progress) every second.
    job = api.submit(task="rt.crash_once", queue="q_proc", timeout=3,
                     retry_backoff={"base": 2, "max": 2, "jitter": False})  # fmt: skip
    # Progress reaches the service through the worker's heartbeats.
    running = api.wait_for(lambda j: j["progress"], 30, job_id=job["id"], what="progress")
    assert running["progress"]["message"] == "pid"
    child = int(running["progress"]["current"])
    assert child != processes.pid
    os.kill(child, signal.SIGKILL)
    retrying = api.wait_for(lambda j: j["status"] != "running", 10, job_id=job["id"])
    assert retrying["status"] == "retrying", retrying
    assert retrying["error"]["type"] == "WorkerLost", retrying["error"]
    done = api.wait_finished(job["id"], 30)
    assert done["result"] == "survived on attempt 2", done
    assert run(api, "q_proc", "rt.add", 1, 1)["result"] == 2  # still serving


def test_hard_time_limit_kills_the_child(api: Api, processes: Process) -> None:
    started = time.monotonic()
    job = run(api, "q_proc", "rt.spin", max_retries=0)
    assert job["status"] == "failed" and job["error"]["type"] == "TimeLimitExceeded", job
    assert time.monotonic() - started < 15
    assert run(api, "q_proc", "rt.add", 2, 2)["result"] == 4  # a new child took over


def test_soft_time_limit_raises_in_a_child(api: Api, processes: Process) -> None:
    assert run(api, "q_proc", "rt.soft")["result"] == "soft limit caught"


# --- threads and asyncio ----------------------------------------------------------------------


def test_soft_time_limit_raises_in_a_thread(api: Api, threads: Process) -> None:
    assert run(api, "q_thr", "rt.soft")["result"] == "soft limit caught"


def test_hard_time_limit_abandons_a_thread(api: Api, threads: Process) -> None:
    job = run(api, "q_thr", "rt.spin", max_retries=0)
    assert job["status"] == "failed" and job["error"]["type"] == "TimeLimitExceeded", job
    # The pool replaced the thread: both slots still work.
    jobs = [api.submit(task="rt.sleep", args=[0.3], queue="q_thr") for _ in range(2)]
    assert all(api.wait_finished(j["id"], 20)["result"] == "slept" for j in jobs)


def test_async_pool_runs_coroutines_concurrently(api: Api, asyncio_pool: Process) -> None:
    jobs = [api.submit(task="rt.amul", args=[i, 2], queue="q_async") for i in range(10)]
    assert [api.wait_finished(j["id"], 30)["result"] for j in jobs] == [2 * i for i in range(10)]
    # Ten half-second sleeps submitted together run on one loop at the same time.
    batch = api.submit_batch([{"task": "rt.window", "queue": "q_async"}] * 10)
    windows = [api.wait_finished(j["id"], 30)["result"] for j in batch]
    most = max(sum(start <= at < end for start, end in windows) for at, _ in windows)
    assert most >= 5, windows


def test_async_pool_runs_sync_tasks_in_threads(api: Api, asyncio_pool: Process) -> None:
    assert run(api, "q_async", "rt.thread")["result"].startswith("celeriac-job")
    assert run(api, "q_async", "rt.add", 20, 22)["result"] == 42


def test_async_soft_time_limit_cancels_the_task(api: Api, asyncio_pool: Process) -> None:
    job = run(api, "q_async", "rt.asoft", max_retries=0)
    assert job["status"] == "failed" and job["error"]["type"] == "SoftTimeLimitExceeded", job


def test_a_child_logs_to_the_new_file_after_logrotate(
    api: Api, spawner: Spawner, service: Service
) -> None:
    log = spawner.workdir / "rotating.log"
    options = ("--pool", "processes", "-c", "1", "--logfile", str(log))
    proc = worker(spawner, service, "q_rot", *options)
    child = run(api, "q_rot", "rt.say", "before")["result"]
    wait_until(lambda: "task says before" in log.read_text(), 10, "the child's first line")
    rotated = log.rename(log.with_name("rotating.log.1"))  # what logrotate does, then:
    proc.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: log.exists() and "reopened log file" in log.read_text(), 10, "a new file")
    assert run(api, "q_rot", "rt.say", "after")["result"] == child  # the same child
    wait_until(lambda: "task says after" in log.read_text(), 10, "the child's line, moved")
    assert "says after" not in rotated.read_text()


def test_solo_pool(api: Api, spawner: Spawner, service: Service) -> None:
    proc = worker(spawner, service, "q_solo", "--pool", "solo")
    assert run(api, "q_solo", "rt.soft")["result"] == "soft limit caught"  # SIGALRM
    assert run(api, "q_solo", "rt.thread")["result"] == "MainThread"
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(20) == 0, proc.log()


def test_cold_shutdown_leaves_a_blocked_thread_behind(
    api: Api, spawner: Spawner, service: Service
) -> None:
    proc = worker(spawner, service, "q_cold", "--pool", "async")
    job = api.submit(task="rt.block", args=[60], queue="q_cold")
    api.wait_for(lambda j: j["status"] == "running", 20, job_id=job["id"], what="the lease")
    proc.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "warm shutdown" in proc.log(), 10, "the warm shutdown")
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(15) == 1, proc.log()  # not held up by the thread still sleeping
    assert api.get(job["id"])["status"] == "queued"  # released: the attempt not counted
    expect(api.cancel(job["id"]), 200)


# --- the registry --------------------------------------------------------------------------


def test_workers_are_listed(
    api: Api, processes: Process, threads: Process, asyncio_pool: Process
) -> None:
    for proc, pool, concurrency in ((processes, "processes", 2), (threads, "threads", 2),
                                    (asyncio_pool, "async", 10)):  # fmt: skip
        entry = registered(api, proc)
        assert entry["status"] == "online" and entry["pool"] == pool, entry
        assert entry["concurrency"] == concurrency and entry["command"] is None
        assert entry["queues"] and entry["name"] and entry["version"] is not None


def test_lost_worker_has_its_leases_reclaimed_at_once(
    api: Api, spawner: Spawner, service: Service
) -> None:
    proc = worker(spawner, service, "q_lost")
    entry = registered(api, proc)
    # A 60 s lease: without the registry, the job would wait a minute for its deadline.
    job = api.submit(task="rt.sleep", args=[60], queue="q_lost", timeout=60)
    api.wait_for(lambda j: j["status"] == "running", 20, job_id=job["id"], what="the lease")
    wait_until(lambda: job["id"] in registered(api, proc)["running"], 10, "a heartbeat")
    proc.kill()
    killed = time.monotonic()
    requeued = api.wait_for(lambda j: j["status"] != "running", 10, job_id=job["id"])
    elapsed = time.monotonic() - killed
    assert requeued["status"] == "queued" and requeued["attempt"] == 1, requeued
    assert elapsed < 2 * HEARTBEAT + 2.0, elapsed  # two intervals, plus a sweep
    lost = next(w for w in expect(api.http.get("/workers"), 200)["workers"]
                if w["id"] == entry["id"])  # fmt: skip
    assert lost["status"] == "lost" and lost["lost_at"], lost
    expect(api.cancel(job["id"]), 200)


def test_quiet_then_shutdown(api: Api, spawner: Spawner, service: Service) -> None:
    proc = worker(spawner, service, "q_quiet")
    entry = registered(api, proc)
    quieted = expect(api.http.post(f"/workers/{entry['id']}/quiet"), 200)
    assert quieted["command"] == "quiet"
    # Once the long-poll that was out when the command came has returned:
    wait_until(lambda: "leasing stopped" in proc.log(), 15, "the worker to stop leasing")
    job = api.submit(task="rt.add", args=[1, 2], queue="q_quiet")
    time.sleep(1.0)
    assert api.get(job["id"])["status"] == "queued"  # nobody leased it
    expect(api.http.post(f"/workers/{entry['id']}/shutdown"), 200)
    assert proc.proc.wait(15) == 0, proc.log()  # warm shutdown: exit status 0
    gone = expect(api.http.get("/workers"), 200)["workers"]
    assert entry["id"] not in [w["id"] for w in gone]  # deregistered on the way out
    expect(api.cancel(job["id"]), 200)


def test_registry_errors(api: Api) -> None:
    missing = "00000000-0000-7000-8000-000000000000"
    response = api.http.post(f"/workers/{missing}/heartbeat", json={"running": []})
    assert response.status_code == 404
    assert response.json()["type"] == "urn:celeriac:problem:worker-not-found"
    assert api.http.post(f"/workers/{missing}/quiet").status_code == 404
    bad = api.http.post("/workers", json={"name": "x", "hostname": "h", "pid": 1,
                                          "queues": ["default"], "concurrency": 0,
                                          "pool": "threads"})  # fmt: skip
    assert bad.status_code == 422


def test_unknown_pool_is_refused(tmp_path: Path) -> None:
    import subprocess

    (tmp_path / "rt_tasks.py").write_text(TASKS)
    done = subprocess.run(
        [sys.executable, "-m", "celeriac", "worker", "-A", "rt_tasks:app", "--pool", "gevent"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "unknown pool" in done.stderr
