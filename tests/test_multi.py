"""``celeriac multi`` and the worker's --pidfile/--logfile, end to end: a real service
(SQLite), daemonised worker nodes that outlive the ``multi`` command that started them,
real signals and files. No mocks.

Two groups of nodes share the module's service, each on a queue of its own: the pair
w1, w2 (WARNING level) goes through start, restart under load and stop; the solo node w3
(INFO level) through a stale pidfile, SIGHUP and SIGKILL.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from celeriac import Client
from celeriac._daemon import expand_path, is_running_worker
from celeriac.cli import cli
from conftest import Spawner, child_env
from typer.testing import CliRunner

T = TypeVar("T")
CELERIAC = [sys.executable, "-m", "celeriac"]
HOST = socket.gethostname()
PIDFILE = "run/%n.pid"  # relative to the module's directory, created by multi
LOGFILE = "log/%n%I.log"
PAIR_QUEUE, SOLO_QUEUE = "multi-pair", "multi-solo"
# A short long-poll keeps each warm shutdown (and so each stop/restart) under a second.
NODE_OPTIONS = ["-A", "mt_tasks", "-c", "2", "--poll-wait", "1"]

TASKS_MODULE = """
import logging
import os
import time

from celeriac import Celeriac, current_job

app = Celeriac("mt")
log = logging.getLogger("mt")

@app.task(name="mt.noisy")
def noisy() -> str:
    log.info("info from %s", current_job.worker)
    log.warning("warning from %s", current_job.worker)
    time.sleep(0.2)
    return current_job.worker

@app.task(name="mt.quick")
def quick(n: int) -> int:
    return n

@app.task(name="mt.hold")
def hold(flag: str, started: str = "") -> str:
    if started:  # the task is under way (a job reads "running" from its lease on)
        open(started, "w").close()
    while not os.path.exists(flag):  # until the test lets go
        time.sleep(0.05)
    return "released"

# A 1.5 s lease: once its worker is killed, the job is queued again within seconds.
@app.task(name="mt.hang_first_attempt", timeout=1.5)
def hang_first_attempt() -> int:
    if current_job.attempt == 1:
        time.sleep(120)
    return current_job.attempt
"""


def eventually(check: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``check`` until it returns something truthy: the state lives in other
    processes, so there is nothing to block on."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Background:
    """A command running on while the test goes on; its output in files."""

    def __init__(self, argv: list[str], workdir: Path, env: dict[str, str]) -> None:
        self.out = workdir / f"background-{time.monotonic_ns()}.out"
        self.err = self.out.with_suffix(".err")
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.popen = subprocess.Popen(argv, cwd=workdir, env=env, stdout=out, stderr=err)

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def wait(self) -> int:
        return self.popen.wait(60)


class Nodes:
    """Runs ``celeriac multi`` in the module's directory, and finds the nodes' files."""

    def __init__(self, workdir: Path, server: str) -> None:
        self.workdir = workdir
        self.env = child_env({"CELERIAC_SERVER_URL": server})

    def multi(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        # multi's own options may come anywhere (a later one wins); node names must
        # come right after the action.
        return subprocess.run(
            [*CELERIAC, "multi", "--pidfile", PIDFILE, "--timeout", "30", *args],
            cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def multi_in_background(self, *args: str) -> Background:
        return Background(
            [*CELERIAC, "multi", "--pidfile", PIDFILE, "--timeout", "30", *args],
            self.workdir, self.env,
        )  # fmt: skip

    def worker(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CELERIAC, "worker", *args], cwd=self.workdir, env=self.env, capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip

    def pidfile(self, name: str) -> Path:
        return self.workdir / expand_path(PIDFILE, f"{name}@{HOST}")

    def pid(self, name: str) -> int:
        return int(self.pidfile(name).read_text())

    def logfile(self, name: str) -> Path:
        return self.workdir / expand_path(LOGFILE, f"{name}@{HOST}")

    def log(self, name: str) -> str:
        path = self.logfile(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def kill_all(self) -> None:
        """Teardown: whatever a failed test left running, by the pid in its pidfile."""
        for pidfile in (self.workdir / "run").glob("*.pid"):
            pid = int(pidfile.read_text() or 0)
            if is_running_worker(pid):
                os.kill(pid, signal.SIGKILL)


def started(result: subprocess.CompletedProcess[str]) -> dict[str, int]:
    """{node name: pid} from ``multi start``/``restart`` output."""
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\S+): started \(pid (\d+)\)$",
                                                  result.stdout, re.M)}  # fmt: skip


def explain(result: subprocess.CompletedProcess[str], nodes: Nodes, *names: str) -> str:
    logs = "".join(f"\n--- {name}.log\n{nodes.log(name)[-3000:]}" for name in names)
    return f"rc={result.returncode}\n{result.stdout}{result.stderr}{logs}"


@pytest.fixture(scope="module")
def nodes(module_spawner: Spawner) -> Iterator[Nodes]:
    (module_spawner.workdir / "mt_tasks.py").write_text(TASKS_MODULE)
    service = module_spawner.service()
    found = Nodes(module_spawner.workdir, service.url)
    yield found
    found.kill_all()


@pytest.fixture(scope="module")
def client(nodes: Nodes) -> Iterator[Client]:
    with Client(nodes.env["CELERIAC_SERVER_URL"]) as api:
        yield api


@pytest.fixture(scope="module")
def pair(nodes: Nodes) -> dict[str, int]:
    # No prefetch: "running" then means on a pool thread, which the stop tests count on.
    result = nodes.multi(
        "start", "w1", "w2", *NODE_OPTIONS, "-Q", PAIR_QUEUE, "-l", "WARNING",
        "--logfile", LOGFILE, "--prefetch-multiplier", "1",
    )  # fmt: skip
    assert result.returncode == 0, explain(result, nodes, "w1", "w2")
    return started(result)  # the nodes fixture kills whatever is left at the end


@pytest.fixture(scope="module")
def solo(nodes: Nodes) -> subprocess.CompletedProcess[str]:
    """w3, started over a stale pidfile (the pid of a process that has exited)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    nodes.pidfile("w3").parent.mkdir(exist_ok=True)
    nodes.pidfile("w3").write_text(f"{gone.pid}\n")
    result = nodes.multi(
        "start", "w3", *NODE_OPTIONS, "-Q", SOLO_QUEUE, "--loglevel", "Info",
        "--logfile", LOGFILE,
    )  # fmt: skip
    return result


def wait_all(client: Client, ids: list[str], timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    return [client.wait(job_id, max(0.1, deadline - time.monotonic())) for job_id in ids]


def test_placeholders_and_node_names() -> None:
    node = "w1@host.example.com"
    assert expand_path("/run/%n.pid", node) == "/run/w1.pid"
    assert expand_path("%h|%p|%d|%%n", node) == f"{node}|{node}|example.com|%n"
    assert expand_path("%n%I.log", node) == "w1.log"  # the main process
    assert expand_path("%n%I-%i.log", node, index=2) == "w1-2-2.log"
    # multi fills in the node, and leaves the process index and %% to the worker.
    assert expand_path("%n%I-%%.log", node, index=None) == "w1%I-%%.log"

    runner = CliRunner()
    names = runner.invoke(cli, ["multi", "names", "w1", "w2@elsewhere", "w3@%h"])
    assert names.exit_code == 0, names.output
    assert names.output.split() == [f"w1@{HOST}", "w2@elsewhere", f"w3@{HOST}"]
    assert runner.invoke(cli, ["multi", "names", "2"]).output.split() == [
        f"celeriac1@{HOST}",
        f"celeriac2@{HOST}",
    ]
    show = runner.invoke(cli, ["multi", "show", "w1", "-A", "proj", "-c", "4", "-l", "warning"])
    assert show.exit_code == 0, show.output
    assert f"worker --hostname=w1@{HOST} --pidfile={Path.cwd()}/w1.pid" in show.output
    assert "--app=proj --concurrency=4 --loglevel=warning" in show.output
    # Mistakes are caught before anything starts.
    assert runner.invoke(cli, ["multi", "start", "w1", "-A", "p", "-c", "many"]).exit_code == 2
    assert runner.invoke(cli, ["multi", "start", "w1", "-A", "p", "-n", "x"]).exit_code == 2
    assert runner.invoke(cli, ["multi", "start", "w1", "w1", "-A", "p"]).exit_code == 2


def test_start_runs_daemonised_nodes_logging_at_their_level(
    nodes: Nodes, pair: dict[str, int], client: Client
) -> None:
    assert set(pair) == {f"w1@{HOST}", f"w2@{HOST}"}
    for name in ("w1", "w2"):
        pid = nodes.pid(name)
        assert pair[f"{name}@{HOST}"] == pid and is_running_worker(pid)
        assert Path(f"/proc/{pid}").exists() and os.getsid(pid) == pid  # a session leader
        assert nodes.logfile(name).name == f"{name}.log"

    def warned_on_both() -> bool:
        return all(f"warning from {n}@{HOST}" in nodes.log(n) for n in ("w1", "w2"))

    deadline = time.monotonic() + 30
    while not warned_on_both():  # which node leases which job is up to them
        assert time.monotonic() < deadline, nodes.log("w1") + nodes.log("w2")
        wait_all(client, [client.submit("mt.noisy", queue=PAIR_QUEUE)["id"] for _ in range(4)])
    for name in ("w1", "w2"):
        assert " INFO " not in nodes.log(name), nodes.log(name)  # --loglevel WARNING


def test_a_second_start_of_a_running_node_is_refused(nodes: Nodes, pair: dict[str, int]) -> None:
    pid = nodes.pid("w1")
    again = nodes.multi("start", "w1", *NODE_OPTIONS, "-Q", PAIR_QUEUE)
    assert again.returncode == 1
    assert f"w1@{HOST}: FAILED: already running (pid {pid}" in again.stdout, again.stdout
    assert nodes.pid("w1") == pid and is_running_worker(pid)

    direct = nodes.worker("-A", "mt_tasks", "--pidfile", str(nodes.pidfile("w1")))
    assert direct.returncode == 1
    assert f"holds the pid of a running worker ({pid})" in direct.stderr


def test_restart_under_a_steady_stream_of_jobs_loses_none(
    nodes: Nodes, pair: dict[str, int], client: Client
) -> None:
    before = {name: nodes.pid(name) for name in ("w1", "w2")}
    submitted: list[str] = []

    def produce() -> None:
        # 100 jobs over ~5 s, in batches of 5: one request per job would make the
        # producer as slow as a loaded machine's service, not 20 jobs a second.
        with Client(nodes.env["CELERIAC_SERVER_URL"]) as producer:
            start = time.monotonic()
            for batch in range(20):
                jobs = [{"task": "mt.quick", "args": [5 * batch + n], "queue": PAIR_QUEUE}
                        for n in range(5)]  # fmt: skip
                submitted.extend(job["id"] for job in producer.submit_batch(jobs))
                time.sleep(max(0.0, start + 0.25 * (batch + 1) - time.monotonic()))

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        eventually(lambda: len(submitted) >= 20, what="the stream to be flowing")
        # No worker options: the restart takes the ones each node was started with.
        restarted = nodes.multi("restart", "w1", "w2")
    finally:
        producer.join()
    assert restarted.returncode == 0, explain(restarted, nodes, "w1", "w2")
    lines = [line.split(" (")[0] for line in restarted.stdout.splitlines()]
    assert lines == [f"{n}@{HOST}: {what}" for n in ("w1", "w2") for what in ("stopped", "started")]
    for name, old_pid in before.items():
        assert not is_running_worker(old_pid)
        assert started(restarted)[f"{name}@{HOST}"] == nodes.pid(name) != old_pid

    jobs = wait_all(client, submitted)
    assert [job["status"] for job in jobs] == ["succeeded"] * 100
    assert sorted(job["result"] for job in jobs) == list(range(100))
    # A lease handed back at shutdown does not count as an attempt: each ran once.
    assert {job["attempt"] for job in jobs} == {1}


def test_stop_lets_running_jobs_finish(nodes: Nodes, pair: dict[str, int], client: Client) -> None:
    release = nodes.workdir / "release-held-jobs"
    marks = [nodes.workdir / f"held-{i}-started" for i in range(4)]
    held = [client.submit("mt.hold", [str(release), str(m)], queue=PAIR_QUEUE)["id"] for m in marks]
    eventually(
        lambda: all(mark.exists() for mark in marks),
        what="a job under way on every pool thread of both nodes",
    )
    waiting = [client.submit("mt.quick", [0], queue=PAIR_QUEUE)["id"] for _ in range(2)]
    pids = {name: nodes.pid(name) for name in ("w1", "w2")}

    impatient = nodes.multi("stop", "w1", "w2", "--timeout", "0.2")
    assert impatient.returncode == 1, explain(impatient, nodes, "w1", "w2")
    assert impatient.stdout.splitlines() == [
        f"{name}@{HOST}: FAILED: still running (pid {pid}), not killed ('kill' would)"
        for name, pid in pids.items()
    ]
    # Stopping again waits for the same warm shutdown: a second SIGTERM would make it
    # cold, and the running jobs would be released instead of finished. (stopwait: stop
    # without a timeout.)
    patient = nodes.multi_in_background("stopwait", "w1", "w2")
    eventually(lambda: patient.stderr().count("already stopping") == 2, what="the 2nd stop")
    assert all(is_running_worker(pid) for pid in pids.values())
    release.touch()
    assert patient.wait() == 0, patient.stdout() + patient.stderr()

    assert patient.stdout().splitlines() == [
        f"{name}@{HOST}: stopped (pid {pid})" for name, pid in pids.items()
    ]
    # multi returned once the processes were gone: by then every report was in.
    assert [client.get(job_id)["status"] for job_id in held] == ["succeeded"] * 4
    assert [client.get(job_id)["status"] for job_id in waiting] == ["queued"] * 2  # not lost
    for job_id in waiting:
        client.cancel(job_id)
    for name, pid in pids.items():
        assert not is_running_worker(pid)
        assert not nodes.pidfile(name).exists()
        assert nodes.pidfile(name).with_suffix(".pid.json").exists()  # for the next start
        assert "warm shutdown" not in nodes.log(name)  # INFO, and these log WARNING+


def test_start_clears_a_stale_pidfile(nodes: Nodes, solo: subprocess.CompletedProcess[str]) -> None:
    assert solo.returncode == 0, explain(solo, nodes, "w3")
    assert f"w3@{HOST}: removed stale pidfile" in solo.stderr
    assert started(solo) == {f"w3@{HOST}": nodes.pid("w3")}
    assert " INFO " in nodes.log("w3")  # --loglevel Info

    # The worker itself does the same when started by hand.
    stale = nodes.workdir / "stale.pid"
    stale.write_text("999999999\n")
    by_hand = nodes.worker("-A", "mt_tasks:no_such_app", "--pidfile", str(stale))
    assert by_hand.returncode == 2  # the missing app, after the pidfile was dealt with
    assert "removed stale pidfile" in by_hand.stderr and not stale.exists()


def test_sighup_reopens_the_log_file(nodes: Nodes, solo: subprocess.CompletedProcess[str]) -> None:
    log = nodes.logfile("w3")
    rotated = log.with_name("w3.log.1")
    log.rename(rotated)  # what logrotate does before it signals
    os.kill(nodes.pid("w3"), signal.SIGHUP)
    eventually(lambda: "SIGHUP: reopened log file" in nodes.log("w3"), what="a new log file")
    assert "SIGHUP" not in rotated.read_text()
    assert is_running_worker(nodes.pid("w3"))


def test_kill_then_the_job_runs_again_after_its_lease(
    nodes: Nodes, solo: subprocess.CompletedProcess[str], client: Client
) -> None:
    job_id = client.submit("mt.hang_first_attempt", queue=SOLO_QUEUE)["id"]
    eventually(lambda: client.get(job_id)["status"] == "running", what="the job to start")
    pid = nodes.pid("w3")

    killed = nodes.multi("kill", "w3")

    assert killed.returncode == 0 and killed.stdout == f"w3@{HOST}: killed (pid {pid})\n"
    assert not is_running_worker(pid) and not nodes.pidfile("w3").exists()
    # From its name alone: the options are the saved ones (the queue among them).
    again = nodes.multi("start", "w3")
    assert again.returncode == 0, explain(again, nodes, "w3")
    job = client.wait(job_id, 30)
    assert (job["status"], job["attempt"], job["result"]) == ("succeeded", 2, 2), job
