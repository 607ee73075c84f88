"""``celeriac demo``: a throwaway service and worker in a temporary directory, a handful
of jobs, and a live log of everything that happens to them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from celeriac.client import FINISHED, Job, JobPage
from celeriac.handle import JobHandle

STARTUP_SECONDS = 20.0
WATCH_SECONDS = 20.0
POLL_INTERVAL = 0.1  # the API has no change feed, so the demo polls the job list
STOP_SECONDS = 10.0
WORKER_THREADS = 4
# A short long-poll, so the worker's warm shutdown at the end takes a second at most.
WORKER = ["worker", "-A", "celeriac.examples.demo:app", "-c", str(WORKER_THREADS)]
WORKER += ["--poll-wait", "1", "--loglevel", "warning"]

TRY_IT = """
to try it yourself, in three terminals:
  celeriac serve
  celeriac worker -A celeriac.examples.demo:app
  celeriac jobs submit math.add --args '[2, 3]' --wait 10"""


class _Process:
    """A child ``celeriac`` command with its output in a log file; stopped on exit."""

    def __init__(self, name: str, arguments: list[str], env: dict[str, str], workdir: str):
        self.name = name
        self.log_path = Path(workdir) / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "celeriac", *arguments],
                env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def __enter__(self) -> _Process:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> int:
        """SIGTERM (a graceful shutdown for both commands), SIGKILL if it hangs."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait()

    def tail(self, lines: int = 25) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(f"    {self.name}| {line}" for line in text)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _environment(workdir: str, server: str) -> dict[str, str]:
    """The caller's environment minus any celeriac configuration: the demo always runs
    an open, loopback-only service on SQL alone."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CELERIAC_")}
    env.update(
        CELERIAC_DATABASE_URL=f"sqlite:///{Path(workdir) / 'demo.db'}",
        CELERIAC_SERVER_URL=server,
        PYTHONUNBUFFERED="1",
    )
    return env


def _wait_ready(server: str, service: _Process) -> bool:
    deadline = time.monotonic() + STARTUP_SECONDS
    with httpx.Client(base_url=server, timeout=2.0) as http:
        while time.monotonic() < deadline and service.popen.poll() is None:
            try:
                if http.get("/readyz").status_code == 200:
                    return True
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(POLL_INTERVAL)
    return False


def _submit() -> list[JobHandle[Any]]:
    from celeriac.examples.demo import add, flaky, shout, slow

    return [
        slow.delay(3.0),
        add.delay(2, 3),
        add.delay(40, 2),
        shout.delay("hello"),
        add.delay(1.5, 2.25),
        flaky.delay(succeed_on_attempt=3),
        add.apply_async((1, 1), delay=3),
    ]


class _Log:
    """Prints one line per thing that changed about a job since the last look."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.seen: dict[str, Job] = {}

    def line(self, job: Job, what: str) -> None:
        offset = time.monotonic() - self.started
        print(f"  +{offset:5.2f}s  {job['id'][-8:]}  {job['task']:<11} {what}", flush=True)

    def submitted(self, job: Job) -> None:
        self.seen[job["id"]] = job
        self.line(job, f"submitted -> {job['status']}{_args(job)}")

    def update(self, job: Job) -> None:
        before = self.seen.get(job["id"])
        if before is None:
            return  # not one of ours
        self.seen[job["id"]] = job
        if job["status"] != before["status"] or job["attempt"] != before["attempt"]:
            self.line(job, f"{_transition(before, job)}{_detail(job)}")
        elif job["progress"] != before["progress"] and job["progress"]:
            progress = job["progress"]
            self.line(job, f"progress {progress.get('current')}/{progress.get('total')}")

    def all_finished(self) -> bool:
        return all(job["status"] in FINISHED for job in self.seen.values())


def _transition(before: Job, job: Job) -> str:
    steps = [before["status"], job["status"]]
    # A new attempt means it was leased, even when it ran too fast for us to see it.
    if job["attempt"] > before["attempt"] and "running" not in steps:
        steps.insert(1, "running")
    return " -> ".join(steps)


def _args(job: Job) -> str:
    shown = [json.dumps(arg) for arg in job["args"]]
    shown += [f"{key}={json.dumps(value)}" for key, value in job["kwargs"].items()]
    return f"  ({', '.join(shown)})" if shown else ""


def _detail(job: Job) -> str:
    if job["status"] == "running":
        return f"  attempt {job['attempt']}"
    if job["status"] == "succeeded":
        return f"  result: {json.dumps(job['result'])}"
    error = job.get("error")
    return f"  {error['type']}: {error['message']}" if error else ""


def _watch(log: _Log, list_jobs: Callable[..., JobPage]) -> bool:
    deadline = time.monotonic() + WATCH_SECONDS
    while time.monotonic() < deadline:
        for job in reversed(list_jobs(limit=100)["jobs"]):  # oldest first
            log.update(job)
        if log.all_finished():
            return True
        time.sleep(POLL_INTERVAL)
    return False


def run_demo() -> int:
    """Run the whole demo; 0 when every job ended as expected (all of them succeed)."""
    from celeriac.examples.demo import app

    with tempfile.TemporaryDirectory(prefix="celeriac-demo-") as workdir, ExitStack() as stack:
        port = _free_port()
        server = f"http://127.0.0.1:{port}"
        env = _environment(workdir, server)
        print(f"celeriac demo: starting a service on {server} (SQLite in {workdir})", flush=True)
        serve = ["serve", "--port", str(port), "--log-level", "warning"]
        service = stack.enter_context(_Process("service", serve, env, workdir))
        if not _wait_ready(server, service):
            print("the service did not become ready:\n" + service.tail(), file=sys.stderr)
            return 1
        worker = stack.enter_context(_Process("worker", WORKER, env, workdir))
        print(f"service ready; a worker with {WORKER_THREADS} threads is starting\n", flush=True)
        app.configure(server=server)
        stack.callback(app.close)
        log = _Log()
        for handle in _submit():
            log.submitted(handle.submitted or handle.refresh())
        finished = _watch(log, app.client.list)
        worker_status = worker.stop()
        return _conclude(log, finished, worker_status, [service, worker])


def _conclude(log: _Log, finished: bool, worker_status: int, processes: list[_Process]) -> int:
    failed = [job for job in log.seen.values() if job["status"] != "succeeded"]
    elapsed = time.monotonic() - log.started
    if finished and not failed and worker_status == 0:
        print(f"\nall {len(log.seen)} jobs succeeded in {elapsed:.1f}s", flush=True)
        print("the worker finished its work and stopped on SIGTERM", flush=True)
        print(TRY_IT, flush=True)
        return 0
    print(f"\n{len(failed)} jobs did not succeed; worker exit status {worker_status}; logs:")
    for process in processes:
        print(process.tail())
    return 1
