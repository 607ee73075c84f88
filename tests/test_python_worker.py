"""The Python package end to end: a real ``celeriac serve`` (SQLite), real ``celeriac
worker`` processes, and the client API in this process. No mocks."""

from __future__ import annotations

import importlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import httpx
import pytest
from celeriac import CeleriacError, Client, JobFailed

REPO = Path(__file__).resolve().parent.parent
CELERIAC = [sys.executable, "-m", "celeriac"]
T = TypeVar("T")

# Written into a temporary directory and imported both here (to submit with typed
# .delay()) and by the worker processes (to run).
TASKS_MODULE = """
from celeriac import Celeriac, current_job

app = Celeriac("pw")

@app.task(name="pw.add")
def add(x: int, y: int) -> int:
    return x + y

@app.task
def double(x: int) -> int:
    return 2 * x

@app.task(name="pw.shout")
async def shout(text: str) -> str:
    return text.upper() + "!"

@app.task(name="pw.flaky", retry_backoff={"base": 0.1, "max": 0.2, "jitter": False})
def flaky(until: int) -> str:
    if current_job.attempt < until:
        raise ConnectionError(f"attempt {current_job.attempt}")
    return f"ok on attempt {current_job.attempt}"

@app.task(name="pw.retry_once")
def retry_once() -> int:
    if current_job.attempt == 1:
        current_job.retry(delay=0.1)
    return current_job.attempt

@app.task(name="pw.broken", max_retries=0)
def broken() -> None:
    raise ValueError("broken on purpose")

@app.task(name="pw.unserialisable")
def unserialisable() -> object:
    return {1, 2}

# A short lease so heartbeats (progress, cancel requests) come every half second.
@app.task(name="pw.until_cancelled", timeout=1.5)
def until_cancelled() -> str:
    current_job.report_progress(1, 2, "waiting")
    while not current_job.wait_cancelled(30):
        pass
    current_job.raise_if_cancelled()
    return "unreachable"

# ``started``: a file the task creates as it begins. A job reads "running" from its lease
# on, a moment before a pool thread enters the task (and a warm shutdown hands back a job
# leased but not yet started): a test that needs the task under way waits for the file.
@app.task(name="pw.sleep", queue="shutdown")
def sleep(seconds: float, started: str = "") -> str:
    if started:
        open(started, "w").close()
    current_job.wait_cancelled(seconds)
    return f"slept {seconds}"
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def eventually(check: Callable[[], T], timeout: float = 15.0, what: str = "condition") -> T:
    """Poll ``check`` until it returns something truthy (the state we wait for lives
    in another process, so there is nothing to block on)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Proc:
    """A ``celeriac`` subcommand with its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.log_path = cwd / f"{name}-{time.monotonic_ns()}.log"
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                [*CELERIAC, *args], env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float = 20.0) -> int:
        return self.popen.wait(timeout)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERIAC_")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("python-worker")
    (path / "pw_tasks.py").write_text(TASKS_MODULE)
    return path


@pytest.fixture(scope="module")
def server(workdir: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = clean_env(CELERIAC_DATABASE_URL=f"sqlite:///{workdir / 'service.db'}")
    service = Proc(
        "service", ["serve", "--port", str(port), "--log-level", "warning"], env, workdir
    )

    def ready() -> bool:
        assert service.popen.poll() is None, service.log()
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        eventually(ready, timeout=30, what="the service to be ready")
        yield url
    finally:
        service.stop()


def start_worker(server: str, workdir: Path, *args: str) -> Proc:
    env = clean_env(CELERIAC_SERVER_URL=server)
    return Proc("worker", ["worker", "--poll-wait", "1", *args], env, workdir)


@pytest.fixture(scope="module")
def worker(server: str, workdir: Path) -> Iterator[Proc]:
    proc = start_worker(server, workdir, "-A", "pw_tasks:app", "-c", "2", "-l", "INFO")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def tasks(server: str, workdir: Path) -> Iterator[ModuleType]:
    sys.path.insert(0, str(workdir))
    try:
        module = importlib.import_module("pw_tasks")
        module.app.configure(server=server)
        yield module
        module.app.close()
    finally:
        sys.path.remove(str(workdir))
        sys.modules.pop("pw_tasks", None)


@pytest.fixture
def client(server: str) -> Iterator[Client]:
    with Client(server) as api:
        yield api


def test_tasks_stay_plain_functions_and_are_named(tasks: ModuleType) -> None:
    assert tasks.add(2, 3) == 5
    assert tasks.add.name == "pw.add"
    assert tasks.add.__name__ == "add"
    assert tasks.shout.is_async and not tasks.add.is_async
    assert set(tasks.app.tasks) >= {"pw.add", "pw.shout", "pw.flaky", "pw.sleep"}

    assert tasks.double.name == "pw_tasks.double"  # module.qualname by default
    assert tasks.double(4) == 8
    with pytest.raises(ValueError, match="explicit"):
        tasks.app.task(lambda: None)  # "<locals>" in its name: the worker could not find it


def test_delay_arguments_are_type_checked(tmp_path: Path) -> None:
    (tmp_path / "typed.py").write_text(
        "from celeriac import Celeriac\n"
        "app = Celeriac('typed')\n"
        "@app.task(name='typed.add')\n"
        "def add(x: int, y: int) -> int:\n"
        "    return x + y\n"
        "@app.task\n"
        "async def shout(text: str) -> str:\n"
        "    return text\n"
        "reveal_type(add.delay(1, 2))\n"
        "reveal_type(shout.delay('a').get())\n"
        "reveal_type(add(1, 2))\n"
        "add.delay('one', 2)\n"
    )
    env = {**os.environ, "MYPYPATH": str(REPO / "workers" / "python")}
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "typed.py",
         "--cache-dir", str(REPO / ".mypy_cache" / "python-worker-typing")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    # Older mypy versions spell builtins out ("builtins.int"), newer ones do not.
    out = result.stdout.replace("builtins.", "")
    assert 'typed.py:9: note: Revealed type is "celeriac.handle.JobHandle[int]"' in out, out
    assert 'typed.py:10: note: Revealed type is "str"' in out, out
    assert 'typed.py:11: note: Revealed type is "int"' in out, out
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "typed.py:12:" in errors[0] and "[arg-type]" in errors[0], out


def test_submit_and_get_results(tasks: ModuleType, worker: Proc) -> None:
    handle = tasks.add.delay(2, 3)
    assert handle.get(timeout=20) == 5
    assert handle.status == "succeeded"
    assert tasks.shout.apply_async(("hi",)).get(timeout=20) == "HI!"
    job = handle.wait(timeout=1)
    assert job["worker"] and job["attempt"] == 1


def test_async_get(tasks: ModuleType, worker: Proc) -> None:
    import asyncio

    async def submit_and_wait() -> int:
        handle = await tasks.add.adelay(20, 22)
        result: int = await handle
        await tasks.app.aclose()
        return result

    assert asyncio.run(submit_and_wait()) == 42


def test_retry_then_success(tasks: ModuleType, worker: Proc) -> None:
    handle = tasks.flaky.delay(3)
    assert handle.get(timeout=20) == "ok on attempt 3"
    assert handle.wait()["attempt"] == 3
    assert tasks.retry_once.delay().get(timeout=20) == 2


def test_failures_are_reported(tasks: ModuleType, worker: Proc) -> None:
    with pytest.raises(JobFailed) as failed:
        tasks.broken.delay().get(timeout=20)
    assert failed.value.status == "failed"
    assert failed.value.error is not None
    assert failed.value.error["type"] == "ValueError"
    assert "broken on purpose" in failed.value.error["traceback"]

    with pytest.raises(JobFailed) as unknown:
        tasks.app.send_task("pw.nobody_runs_this", max_retries=5).get(timeout=20)
    assert unknown.value.error is not None and unknown.value.error["type"] == "UnknownTask"
    assert unknown.value.job["attempt"] == 1  # not retried

    with pytest.raises(JobFailed) as unserialisable:
        tasks.unserialisable.delay().get(timeout=20)
    assert unserialisable.value.error is not None
    assert unserialisable.value.error["type"] == "ResultNotSerializable"


def test_progress_and_cancel_reach_a_running_task(
    tasks: ModuleType, worker: Proc, client: Client
) -> None:
    handle = tasks.until_cancelled.delay()
    job = eventually(lambda: (j := handle.refresh())["progress"] and j, what="progress")
    assert job["progress"] == {"current": 1, "total": 2, "message": "waiting"}
    client.cancel(handle.id)
    with pytest.raises(JobFailed) as cancelled:
        handle.get(timeout=20)
    assert cancelled.value.status == "cancelled"


def test_client_errors_carry_the_problem(client: Client) -> None:
    with pytest.raises(CeleriacError) as missing:
        client.get("00000000-0000-7000-8000-000000000000")
    assert missing.value.status == 404
    with pytest.raises(CeleriacError) as invalid:
        client.submit("bad name!")
    assert invalid.value.status == 422 and invalid.value.title


def test_jobs_cli(server: str, worker: Proc, workdir: Path) -> None:
    env = clean_env(CELERIAC_SERVER_URL=server)
    ran = subprocess.run(
        [*CELERIAC, "jobs", "submit", "pw.add", "--args", "[1, 2]", "--wait", "20"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert '"result": 3' in ran.stdout and '"status": "succeeded"' in ran.stdout
    missing = subprocess.run(
        [*CELERIAC, "jobs", "get", "00000000-0000-7000-8000-000000000000"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: 404")


def test_sigterm_finishes_the_running_job_and_leases_no_more(
    tasks: ModuleType, server: str, workdir: Path, client: Client
) -> None:
    proc = start_worker(server, workdir, "-A", "pw_tasks.app", "-Q", "shutdown", "-c", "2")
    started = workdir / f"started-{time.monotonic_ns()}"
    try:
        running = tasks.sleep.delay(1.5, str(started))
        eventually(started.exists, what="the task to start")
        proc.signal(signal.SIGTERM)
        eventually(lambda: "warm shutdown" in proc.log(), what="the signal to be handled")
        later = tasks.sleep.delay(0.1)
        assert proc.wait(timeout=20) == 0, proc.log()
    finally:
        proc.stop()
    assert running.wait(timeout=1)["result"] == "slept 1.5"
    assert later.status == "queued"  # never run: not leased, or leased and handed back
    client.cancel(later.id)


def test_second_signal_releases_unfinished_jobs(
    tasks: ModuleType, server: str, workdir: Path, client: Client
) -> None:
    proc = start_worker(server, workdir, "-A", "pw_tasks", "-Q", "shutdown", "-c", "1")
    started = workdir / f"started-{time.monotonic_ns()}"
    try:
        stuck = tasks.sleep.delay(60, str(started))
        eventually(started.exists, what="the task to start")
        proc.signal(signal.SIGTERM)
        # Two signals sent at once may arrive as one: wait for the first to be handled.
        eventually(lambda: "warm shutdown" in proc.log(), what="the warm shutdown to start")
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 1, proc.log()
    finally:
        proc.stop()
    job = client.get(stuck.id)
    assert job["status"] == "queued", job  # released: another worker may take it now
    client.cancel(stuck.id)


def test_sigusr1_dumps_stacks_and_sigquit_is_a_cold_shutdown_at_once(
    tasks: ModuleType, server: str, workdir: Path, client: Client
) -> None:
    proc = start_worker(server, workdir, "-A", "pw_tasks", "-Q", "shutdown", "-c", "1")
    started = workdir / f"started-{time.monotonic_ns()}"
    try:
        stuck = tasks.sleep.delay(60, str(started))
        eventually(started.exists, what="the task to start")
        proc.signal(signal.SIGUSR1)  # a stuck worker shows where it is, and goes on
        # Every thread's stack, the task's own frame among them.
        task_frame = re.compile(r'pw_tasks\.py", line \d+ in sleep')
        eventually(lambda: task_frame.search(proc.log()), what="the stack dump")
        assert proc.popen.poll() is None, proc.log()
        assert client.get(stuck.id)["status"] == "running"
        proc.signal(signal.SIGQUIT)  # no warm shutdown first
        assert proc.wait(timeout=20) == 1, proc.log()
    finally:
        proc.stop()
    assert "warm shutdown" not in proc.log()
    job = client.get(stuck.id)
    assert job["status"] == "queued", job  # released, the attempt not counted
    assert job["attempt"] == 0, job
    client.cancel(stuck.id)


def test_an_idle_worker_leaves_at_once_despite_its_long_poll(server: str, workdir: Path) -> None:
    """SIGTERM ends the long-poll in flight (half-closing its connection) rather than
    sitting out the 30 s poll wait."""
    proc = start_worker(server, workdir, "-A", "pw_tasks", "-Q", "idle", "--poll-wait", "30")
    try:
        eventually(lambda: "http transport" in proc.log(), what="the worker to start")
        time.sleep(0.3)  # into its long-poll
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, proc.log()
        assert time.monotonic() - started < 5, proc.log()
    finally:
        proc.stop()


def test_prefetched_jobs_wait_for_a_slot_and_go_back_at_a_warm_shutdown(
    tasks: ModuleType, server: str, workdir: Path, client: Client
) -> None:
    # -c 1 and the default prefetch multiplier (4): one job runs, three more are held.
    marks = [workdir / f"prefetch-{i}-{time.monotonic_ns()}" for i in range(5)]
    jobs = [tasks.sleep.apply_async([2.0, str(mark)], queue="prefetch") for mark in marks]
    proc = start_worker(server, workdir, "-A", "pw_tasks", "-Q", "prefetch", "-c", "1")
    try:
        statuses = lambda: sorted(job.status for job in jobs)  # noqa: E731
        eventually(lambda: statuses() == ["queued"] + ["running"] * 4, what="4 jobs leased")
        eventually(lambda: any(mark.exists() for mark in marks), what="one task to start")
        proc.signal(signal.SIGTERM)
        # The held ones go back at once, while the running one finishes.
        eventually(lambda: statuses() == ["queued"] * 4 + ["running"], what="held jobs back")
        assert proc.wait(timeout=20) == 0, proc.log()
    finally:
        proc.stop()
    finished = [job for job in jobs if job.status == "succeeded"]
    assert len(finished) == 1, [client.get(job.id) for job in jobs]  # only the one started
    for job in jobs:
        if job not in finished:
            answer = client.get(job.id)
            assert answer["status"] == "queued" and answer["attempt"] == 0, answer
            client.cancel(job.id)


def test_serve_refuses_open_non_loopback_address(tmp_path: Path) -> None:
    ran = subprocess.run(
        [*CELERIAC, "serve", "--host", "0.0.0.0", "--port", str(free_port())],
        env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 2
    assert "--insecure" in ran.stderr


def test_demo_runs_clean(tmp_path: Path) -> None:
    ran = subprocess.run(
        [*CELERIAC, "demo"], env=clean_env(), cwd=tmp_path, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "all 7 jobs succeeded" in ran.stdout
