"""Issue 12, finding 10: outages answer 503, once.

A PRIVATE PostgreSQL cluster, owned by this module (initdb + pg_ctl into a temporary
directory, on a spare loopback port), is stopped with ``pg_ctl stop -m immediate`` under a
submit load and started again: no 500 ever, 503 problem+json with Retry-After meanwhile,
202 after, a bounded number of log lines, and every acknowledged job is in SQL. And the
service starts while that cluster is down: /healthz 200 and /readyz 503 at once, ready
once the database answers.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from conftest import (
    SERVICE_TUNING,
    Process,
    Service,
    assert_problem,
    child_env,
    expect,
    free_port,
    service_command,
    spawn,
    start_service,
    unavailable,
)

from service.outage import is_unreachable

OUTAGE_WORDS = ("unreachable", "reachable again", "LISTEN connection", "start-up:")


def _initdb() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    path = found[-1] if found else shutil.which("initdb")
    return Path(path) if path else None


def _version(path: str) -> int:
    part = Path(path).parts[-3]
    return int(part) if part.isdigit() else 0


@dataclass
class Cluster:
    """A PostgreSQL cluster of our own: stopping it hurts no other test."""

    bindir: Path
    root: Path
    port: int
    user: str | None  # run the server binaries as this user (postgres refuses root)
    running: bool = field(default=False)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, binary: str, *args: str) -> None:
        command = [str(self.bindir / binary), *args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, timeout=60, check=False)
        assert done.returncode == 0, f"{binary} {args}: {done.stdout!r} {done.stderr!r}"

    def init(self) -> None:
        self._run("initdb", "-D", str(self.root / "data"), "-A", "trust", "-U", "postgres",
                  "--no-sync")  # fmt: skip

    def start(self) -> None:
        options = (
            # fsync=off only: an immediate stop kills processes, not the OS's page cache.
            # (synchronous_commit=off would lose acknowledged commits, and this test.)
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        )
        data, log = str(self.root / "data"), str(self.root / "server.log")
        self._run("pg_ctl", "-D", data, "-o", options, "-l", log, "-w", "-t", "30", "start")
        self.running = True

    def stop(self, mode: str = "immediate") -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", mode, "-w", "stop")
        self.running = False

    def job_ids(self, queue: str) -> set[str]:
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres") as conn:
            rows = conn.execute("SELECT id FROM jobs WHERE queue = %s", (queue,)).fetchall()
        return {str(row[0]) for row in rows}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    initdb = _initdb()
    if initdb is None:
        unavailable("PostgreSQL's initdb was not found (apt install postgresql)")
        raise AssertionError("unreachable")
    user = None
    root = Path(tempfile.mkdtemp(prefix="celeriac-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root: hand the directory over
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root and there is no postgres user to run initdb as")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        user = "postgres"
    made = Cluster(initdb.parent, root, free_port(), user)
    try:
        made.init()
        made.start()
        migrate = subprocess.run(
            [sys.executable, "-m", "celeriac", "migrate"],
            env=child_env({"CELERIAC_DATABASE_URL": made.url}),
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert migrate.returncode == 0, migrate.stderr.decode(errors="replace")
        yield made
    finally:
        if made.running:
            made.stop()
        shutil.rmtree(root, ignore_errors=True)


def settings_for(cluster: Cluster) -> dict[str, str]:
    return {**SERVICE_TUNING, "CELERIAC_DATABASE_URL": cluster.url, "CELERIAC_BROKER_URL": "sql"}


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def outage_lines(process: Process) -> list[str]:
    text = process.log_path.read_text(errors="replace")
    return [line for line in text.splitlines() if any(w in line for w in OUTAGE_WORDS)]


@dataclass
class Load:
    """Submitting threads that record every answer, tagged with the phase it came in."""

    url: str
    queue: str
    phase: str = "before"
    # (phase, status, Retry-After, job id of a 2xx, problem type of a 4xx/5xx)
    answers: list[tuple[str, int, str | None, str | None, str | None]] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=20.0) as client:
            while not self.stop.is_set():
                phase = self.phase
                try:
                    response = client.post("/jobs", json={"task": "t.x", "queue": self.queue})
                except httpx.TransportError as exc:
                    with self.lock:
                        self.transport_errors.append(repr(exc))
                    continue
                status, body = response.status_code, response.json()
                job = body.get("id") if status == 202 else None
                problem = None
                if status >= 400:
                    problem = f"{response.headers.get('content-type')} {body.get('type')}"
                with self.lock:
                    retry_after = response.headers.get("retry-after")
                    self.answers.append((phase, status, retry_after, job, problem))
                if status == 503:
                    time.sleep(0.02)  # a client honours Retry-After; this one just paces

    def count(self, phase: str, status: int) -> int:
        with self.lock:
            return sum(1 for p, s, *_ in self.answers if p == phase and s == status)


@contextlib.contextmanager
def loaded(url: str, queue: str, threads: int = 4) -> Iterator[Load]:
    load = Load(url, queue)
    workers = [threading.Thread(target=load.run, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        yield load
    finally:
        load.stop.set()
        for worker in workers:
            worker.join(30)


def test_database_stopped_under_load(cluster: Cluster, tmp_path: Path) -> None:
    service = start_service(settings_for(cluster), tmp_path)
    queue = f"q_{uuid.uuid4().hex[:8]}"
    try:
        with loaded(service.url, queue) as load:
            wait_until(lambda: load.count("before", 202) >= 20, 15, "submits before the outage")
            load.phase = "during"
            cluster.stop("immediate")
            wait_until(lambda: load.count("during", 503) >= 20, 15, "503s during the outage")
            ready = httpx.get(f"{service.url}/readyz", timeout=5)
            assert ready.status_code == 503, ready.text
            assert ready.json()["checks"]["database"].startswith("unavailable"), ready.text
            time.sleep(2.0)  # the outage lasts a few seconds under load (the point of the test)
            cluster.start()
            load.phase = "after"
            wait_until(lambda: load.count("after", 202) >= 20, 15, "submits after the outage")
        expect(httpx.get(f"{service.url}/readyz", timeout=5), 200)
    finally:
        code = service.stop()
    log = service.log(30000)
    assert code in (0, -15), f"the service exited {code}:\n{log}"

    statuses = {status for _, status, *_ in load.answers}
    assert statuses <= {202, 503}, f"answers other than 202 and 503: {statuses}\n{log}"
    assert not load.transport_errors, load.transport_errors[:3]
    problems = {problem for _, status, _, _, problem in load.answers if status == 503}
    assert problems == {"application/problem+json urn:celeriac:problem:database-unavailable"}, (
        problems
    )
    retry_after = {value for _, status, value, *_ in load.answers if status == 503}
    assert retry_after and all(v is not None and 1 <= int(v) <= 5 for v in retry_after), retry_after
    # Once the database is back, submits are accepted again (only the first few may still
    # meet it starting up).
    last = [status for phase, status, *_ in load.answers if phase == "after"][-20:]
    assert last == [202] * 20, last

    lines = outage_lines(service)
    assert "Traceback" not in log, log
    assert 2 <= len(lines) < 10, "\n".join(lines) or log
    assert any("unreachable" in line for line in lines), lines
    assert any("reachable again" in line for line in lines), lines

    acknowledged = {job for _, status, _, job, _ in load.answers if status == 202 and job}
    missing = acknowledged - cluster.job_ids(queue)
    assert not missing, f"{len(missing)} acknowledged jobs are not in SQL: {sorted(missing)[:5]}"


@dataclass(frozen=True)
class Started:
    service: Service
    client: httpx.Client

    def answers(self, path: str, status: int) -> bool:
        """Whether ``GET path`` answers ``status`` now (a service not listening yet: no);
        the service must still be running."""
        assert self.service.proc.poll() is None, f"the service exited:\n{self.service.log()}"
        with contextlib.suppress(httpx.TransportError):
            return self.client.get(path).status_code == status
        return False


@contextlib.contextmanager
def started_service(env: dict[str, str], tmp_path: Path) -> Iterator[Started]:
    """``celeriac serve`` with ``env``, and a client of it; stopped at the end, which must
    be clean: a normal exit, no traceback in its log."""
    port = free_port()
    process = spawn(service_command(port), env, tmp_path, f"service-{port}")
    service = Service(process.proc, process.log_path, f"http://127.0.0.1:{port}")
    try:
        with httpx.Client(base_url=service.url, timeout=5) as client:
            yield Started(service, client)
    finally:
        code = service.stop()
    log = service.log(30000)
    assert code in (0, -15), f"the service exited {code}:\n{log}"
    assert "Traceback" not in log, log


def test_starts_while_database_is_down(cluster: Cluster, tmp_path: Path) -> None:
    cluster.stop("fast")
    env = child_env(settings_for(cluster))
    # Compose runs `celeriac migrate` first, beside a database that may still be starting.
    migrate = spawn([sys.executable, "-m", "celeriac", "migrate", "--wait", "30"], env,
                    tmp_path, "migrate")  # fmt: skip
    with started_service(env, tmp_path) as started:
        try:
            client, answers = started.client, started.answers
            wait_until(lambda: answers("/healthz", 200), 15, "/healthz while the DB is down")
            assert answers("/readyz", 503)
            refused = client.post("/jobs", json={"task": "t.x"})
            assert_problem(refused, 503, "database-unavailable")
            assert 1 <= int(refused.headers["retry-after"]) <= 5
            wait_until(lambda: "waiting for the database" in migrate.log(), 15, "migrate waits")
            assert migrate.proc.poll() is None, migrate.log()
            cluster.start()
            assert migrate.proc.wait(30) == 0, migrate.log()
            wait_until(lambda: answers("/readyz", 200), 20, "/readyz once the DB is up")
            job = expect(client.post("/jobs", json={"task": "t.x"}), 202)
            assert expect(client.get(f"/jobs/{job['id']}"), 200)["status"] == "queued"
        finally:
            migrate.stop()
    assert len(outage_lines(started.service)) < 10, started.service.log(30000)


def test_a_data_error_is_not_an_outage(cluster: Cluster) -> None:
    """The classification, against real drivers: refused connections are an outage; a
    statement the database refuses is not."""
    engine = sa.create_engine(cluster.url)
    closed = sa.create_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres",
        connect_args={"connect_timeout": 2},
    )
    try:
        with pytest.raises(sa.exc.DBAPIError) as data_error, engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1 / 0")
        assert not is_unreachable(data_error.value)
        with pytest.raises(sa.exc.DBAPIError) as refused, closed.connect():
            pass
        assert is_unreachable(refused.value)
    finally:
        engine.dispose()
        closed.dispose()


def test_an_unmigrated_database_is_served_once_migrated(tmp_path: Path) -> None:
    """``serve --no-migrate`` on a database nobody migrated (no SQL server needed: a fresh
    SQLite file): it answers, but is not ready, says why (`celeriac migrate`) in /readyz,
    every route's 503 and its log, instead of a 500 on every request; once migrated it
    serves, without a restart."""
    database = f"sqlite:///{tmp_path / 'unmigrated.db'}"
    env = child_env({**SERVICE_TUNING, "CELERIAC_DATABASE_URL": database})
    with started_service(env, tmp_path) as started:
        client = started.client
        wait_until(lambda: started.answers("/healthz", 200), 15, "/healthz")

        def says_migrate() -> bool:  # once start-up has looked at the schema
            return "celeriac migrate" in client.get("/readyz").json()["checks"]["database"]

        wait_until(says_migrate, 15, "/readyz to name the migration")
        ready = client.get("/readyz")
        assert ready.status_code == 503, ready.text
        refused = client.post("/jobs", json={"task": "t.x"})
        assert_problem(refused, 503, "database-unavailable")
        assert "celeriac migrate" in refused.json()["detail"]
        migrate = spawn([sys.executable, "-m", "celeriac", "migrate"], env, tmp_path, "migrate")
        assert migrate.proc.wait(60) == 0, migrate.log()
        wait_until(lambda: started.answers("/readyz", 200), 15, "/readyz once migrated")
        job = expect(client.post("/jobs", json={"task": "t.x"}), 202)
        assert expect(client.get(f"/jobs/{job['id']}"), 200)["status"] == "queued"
    log = started.service.log(30000)
    assert "celeriac migrate" in log, log
