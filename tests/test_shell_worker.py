"""The POSIX sh worker (workers/shell/worker.sh) against a real service: it completes a
job, fails one, runs a shell-function task, stops a cancelled job, and leaves on SIGTERM.
Needs sh, curl and jq (skipped locally without them, a failure under CI=true)."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, Api, Process, Service, Spawner, unavailable

SHELL_DIR = REPO / "workers" / "shell"
WORKER = SHELL_DIR / "worker.sh"
SCRIPTS = [WORKER, SHELL_DIR / "tasks.sh", *sorted((SHELL_DIR / "tasks").iterdir()),
           REPO / "examples" / "producers" / "submit.sh"]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:
    for tool in ("sh", "curl", "jq"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed: the shell worker needs sh, curl and jq")


@pytest.fixture(scope="module")
def shell_service(module_spawner: Spawner) -> Service:
    return module_spawner.service()


@pytest.fixture
def http(shell_service: Service) -> Iterator[Api]:
    with Api(shell_service.url) as client:
        yield client


def start_shell_worker(spawner: Spawner, url: str, queue: str) -> Process:
    env = {
        "CELERIAC_SERVER_URL": url,
        "CELERIAC_QUEUES": queue,
        "CELERIAC_POLL_WAIT": "1",
        "CELERIAC_LEASE_SECONDS": "3",  # heartbeats every second
        "CELERIAC_TASKS_FILE": str(SHELL_DIR / "tasks.sh"),
    }
    return spawner.process(["sh", str(WORKER)], "shell-worker", env)


def test_the_scripts_parse() -> None:
    for script in SCRIPTS:
        done = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, f"{script}: {done.stderr}"
    if shutil.which("shellcheck"):
        done = subprocess.run(
            ["shellcheck", "-s", "sh", *map(str, SCRIPTS)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout


def test_the_shell_worker_completes_and_fails_jobs(
    spawner: Spawner, shell_service: Service, http: Api, queue: str
) -> None:
    worker = start_shell_worker(spawner, shell_service.url, queue)
    add = http.submit(task="math.add", args=[2, 3], queue=queue)
    # Quotes and $(...) in an argument must reach the task as data, never as code.
    tricky = 'it\'s "quoted"; $(touch pwned) `touch pwned`'
    fails = http.submit(task="demo.fail", args=[tricky], queue=queue, max_retries=3)
    shout = http.submit(task="text.shout", args=["hello world"], queue=queue)
    unknown = http.submit(task="no.such.task", queue=queue)

    done = http.wait_finished(add["id"], timeout=30)
    assert (done["status"], done["result"], done["attempt"]) == ("succeeded", 5, 1), worker.log()
    assert done["worker"].startswith("sh-")

    failed = http.wait_finished(fails["id"], timeout=30)
    assert (failed["status"], failed["attempt"]) == ("failed", 1)  # exit 100: no retry
    assert failed["error"]["type"] == "ExitStatus"
    assert failed["error"]["message"] == f"demo.fail exited with status 100: {tricky}"
    assert not (Path(spawner.workdir) / "pwned").exists()

    assert http.wait_finished(shout["id"], timeout=30)["result"] == "HELLO WORLD!"
    missing = http.wait_finished(unknown["id"], timeout=30)
    assert (missing["status"], missing["error"]["type"]) == ("failed", "UnknownTask")


def test_the_shell_worker_reports_progress_and_stops_when_cancelled(
    spawner: Spawner, shell_service: Service, http: Api, queue: str
) -> None:
    worker = start_shell_worker(spawner, shell_service.url, queue)
    job = http.submit(task="demo.slow", args=[60], queue=queue)
    http.wait_for(
        lambda j: (j["progress"] or {}).get("current", 0) >= 1,
        timeout=20,
        job_id=job["id"],
        what="progress from a heartbeat",
    )
    http.cancel(job["id"])
    done = http.wait_finished(job["id"], timeout=15)
    assert done["status"] == "cancelled", worker.log()
    assert done["error"]["type"] == "Cancelled"

    # SIGTERM: the worker finishes what it runs (nothing now) and leaves.
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(15) == 0, worker.log()
    assert "stopped" in worker.log()
