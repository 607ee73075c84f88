"""Shared fixtures: the backend matrix, real service processes, and a small HTTP helper.

The matrix is {sqlite, postgres, mariadb} x {sql, redis} broker, plus ``postgres-amqp``
(RabbitMQ; ``sqlite-amqp`` on request), ids like ``sqlite-sql`` or ``postgres-redis``;
restrict it with ``CELERIAC_TEST_BACKENDS=sqlite-sql,postgres-redis``.
Every backend gets a fresh database built only by migrating, a Redis key prefix of its
own, and ONE real ``celeriac serve`` process for the whole session: tests isolate
themselves with unique queue names (the ``queue`` fixture). PostgreSQL, MariaDB and Redis
run on loopback; when one is unreachable its backends are skipped locally and fail in CI
(``CI=true``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
IN_CI = os.environ.get("CI", "").lower() == "true"

PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
MARIADB_ADMIN = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}
MARIADB_URL = "mariadb+pymysql://root@127.0.0.1:3306/{name}"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
AMQP_HOST, AMQP_PORT = "127.0.0.1", 5672  # issue 9: RabbitMQ, guest/guest

DATABASES = ("sqlite", "postgres", "mariadb")
BROKERS = ("sql", "redis")
ALL_BACKENDS = tuple(f"{database}-{broker}" for database in DATABASES for broker in BROKERS)
# Issue 9: RabbitMQ with PostgreSQL only by default, to keep the suite's length in check.
DEFAULT_BACKENDS = (*ALL_BACKENDS, "postgres-amqp")
ALL_BACKENDS = (*DEFAULT_BACKENDS, "sqlite-amqp")

FINISHED = frozenset({"succeeded", "failed", "cancelled", "expired"})

# Short timers so leases expire, retries come due and the index is repaired quickly.
SERVICE_TUNING = {
    "CELERIAC_RECONCILE_INTERVAL_SECONDS": "0.3",
    "CELERIAC_DEFAULT_LEASE_SECONDS": "2",
    "CELERIAC_SQL_POLL_FALLBACK_SECONDS": "0.2",
    "CELERIAC_LOG_LEVEL": "warning",
}
READY_TIMEOUT = 30.0


def selected_backends() -> tuple[str, ...]:
    raw = os.environ.get("CELERIAC_TEST_BACKENDS", "").strip()
    if not raw:
        return DEFAULT_BACKENDS
    wanted = [name.strip() for name in raw.split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(ALL_BACKENDS))
    if unknown:
        raise pytest.UsageError(
            f"CELERIAC_TEST_BACKENDS: unknown backends {unknown}; choose from {ALL_BACKENDS}"
        )
    return tuple(name for name in ALL_BACKENDS if name in wanted)


SELECTED_BACKENDS = selected_backends()


# --- availability of the loopback services ---------------------------------------------


def unavailable(reason: str) -> None:
    """Skip on a developer's machine; in CI a missing service is a failure."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true, so this is a failure, not a skip)")
    pytest.skip(reason)


def _probe_postgres() -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute("SELECT 1")


def _probe_mariadb() -> None:
    import pymysql

    conn = pymysql.connect(**MARIADB_ADMIN, connect_timeout=3)
    conn.close()


def _probe_redis() -> None:
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=3)
    try:
        client.ping()
    finally:
        client.close()


def _probe_rabbitmq() -> None:
    """An AMQP 0-9-1 protocol header must be answered with a Connection.Start frame."""
    with socket.create_connection((AMQP_HOST, AMQP_PORT), timeout=3) as sock:
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        if not sock.recv(1).startswith(b"\x01"):
            raise ConnectionError("not an AMQP 0-9-1 broker")


_PROBES: dict[str, Callable[[], None]] = {
    "postgres": _probe_postgres,
    "mariadb": _probe_mariadb,
    "redis": _probe_redis,
    "rabbitmq": _probe_rabbitmq,
}
_availability: dict[str, str | None] = {}


def require_available(what: str) -> None:
    """Skip (or, in CI, fail) unless ``what`` (postgres, mariadb, redis, rabbitmq) answers."""
    if what not in _PROBES:
        return
    if what not in _availability:
        try:
            _PROBES[what]()
            _availability[what] = None
        except Exception as exc:
            _availability[what] = f"{what} on 127.0.0.1 is unreachable: {exc}"
    reason = _availability[what]
    if reason is not None:
        unavailable(reason)


# --- databases and Redis prefixes -------------------------------------------------------


def unique_name(prefix: str = "celeriac_t_") -> str:
    return prefix + secrets.token_hex(5)


@contextlib.contextmanager
def fresh_database(kind: str, workdir: Path) -> Iterator[str]:
    """A new, empty database of ``kind``; yields its SQLAlchemy URL and drops it after."""
    require_available(kind)
    name = unique_name()
    if kind == "sqlite":
        path = workdir / f"{name}.db"
        try:
            yield f"sqlite:///{path}"
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
    elif kind == "postgres":
        import psycopg

        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield PG_URL.format(name=name)
        finally:
            with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    elif kind == "mariadb":
        import pymysql

        def admin(statement: str) -> None:
            conn = pymysql.connect(**MARIADB_ADMIN, connect_timeout=5, autocommit=True)
            try:
                with conn.cursor() as cursor:
                    cursor.execute(statement)
            finally:
                conn.close()

        admin(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        try:
            yield MARIADB_URL.format(name=name)
        finally:
            admin(f"DROP DATABASE IF EXISTS `{name}`")
    else:
        raise ValueError(f"unknown database kind {kind!r}")


def redis_client(db: int = 0) -> Any:
    import redis

    return redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_connect_timeout=3)


def delete_redis_prefix(prefix: str, db: int = 0) -> int:
    """Delete every key the service keeps under ``prefix`` (all live under ``{prefix}``):
    for this prefix's index, the equivalent of FLUSHDB."""
    client = redis_client(db)
    try:
        keys = list(client.scan_iter(match=f"{{{prefix}}}*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


def rabbitmqctl(*args: str, timeout: float = 60.0) -> str | None:
    """Run ``rabbitmqctl`` (as root, on this machine's node); None if it cannot be run."""
    import shutil

    if shutil.which("rabbitmqctl") is None or os.geteuid() != 0:
        return None
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@contextlib.contextmanager
def amqp_vhost() -> Iterator[str]:
    """A RabbitMQ virtual host of our own, deleted with everything in it afterwards; the
    default vhost ``/`` when rabbitmqctl cannot be run (then a unique queue prefix keeps
    backends apart, and their queues stay behind)."""
    require_available("rabbitmq")
    name = unique_name("celeriac_t_")
    if rabbitmqctl("add_vhost", name) is None:
        yield "/"
        return
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        rabbitmqctl("delete_vhost", name)


def amqp_url(vhost: str) -> str:
    from urllib.parse import quote

    return f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/{quote(vhost, safe='')}"


@dataclass(frozen=True)
class Backend:
    """One database x broker combination, with its own fresh database and Redis prefix."""

    database: str  # sqlite | postgres | mariadb
    broker: str  # sql | redis | amqp
    database_url: str
    redis_prefix: str
    redis_db: int = 0
    amqp_vhost: str = "/"

    @property
    def name(self) -> str:
        return f"{self.database}-{self.broker}"

    @property
    def broker_url(self) -> str:
        if self.broker == "sql":
            return "sql"
        if self.broker == "amqp":
            return amqp_url(self.amqp_vhost)
        return f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.redis_db}"

    def env(self) -> dict[str, str]:
        return {
            "CELERIAC_DATABASE_URL": self.database_url,
            "CELERIAC_BROKER_URL": self.broker_url,
            "CELERIAC_REDIS_PREFIX": self.redis_prefix,
            "CELERIAC_AMQP_PREFIX": self.redis_prefix,  # unique even in a shared vhost
        }


@contextlib.contextmanager
def make_backend(
    database: str, broker: str, workdir: Path, *, redis_db: int = 0
) -> Iterator[Backend]:
    """A fresh database migrated to head (the only way test databases are built) and,
    for the Redis broker, a unique key prefix whose keys are deleted afterwards; for
    RabbitMQ, a vhost of its own."""
    from service.migrate import upgrade

    if broker == "redis":
        require_available("redis")
    prefix = unique_name("celeriac_t_")
    with contextlib.ExitStack() as stack, fresh_database(database, workdir) as url:
        vhost = stack.enter_context(amqp_vhost()) if broker == "amqp" else "/"
        upgrade(url)
        backend = Backend(database, broker, url, prefix, redis_db, vhost)
        try:
            yield backend
        finally:
            if broker == "redis":
                delete_redis_prefix(prefix, redis_db)


# --- processes --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(settings: Mapping[str, str]) -> dict[str, str]:
    """The environment for a child process: ours less any CELERIAC_* setting (a
    developer's shell must not leak into the service under test), plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERIAC_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env["PYTHONUNBUFFERED"] = "1"
    env.update(settings)
    return env


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    """SIGTERM, then SIGKILL if it has not left within ``timeout``; by pid only.

    Before the SIGKILL, SIGUSR1 asks a celeriac process to write its threads' stacks
    to its log, so a hang shows where it hung."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1.0)
            proc.kill()
            proc.wait(10)
    return proc.returncode


@dataclass
class Process:
    """A child process whose combined output goes to a log file (no pipes to drain)."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self, limit: int = 6000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no output)"
        return text[-limit:] or "(no output)"

    def stop(self, timeout: float = 20.0) -> int:
        return stop_process(self.proc, timeout)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def spawn(command: Sequence[str], env: Mapping[str, str], workdir: Path, name: str) -> Process:
    log_path = workdir / f"{name}-{secrets.token_hex(3)}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            list(command),
            cwd=workdir,  # not the repo: a developer's .env there must not apply
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Process(proc, log_path)


def service_command(port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celeriac",
        "serve",
        "--no-migrate",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *extra,
    ]


@dataclass
class Service(Process):
    url: str = ""
    backend: Backend | None = None
    settings: dict[str, str] = field(default_factory=dict)


def start_service(
    settings: Mapping[str, str], workdir: Path, *, backend: Backend | None = None
) -> Service:
    """Start ``celeriac serve`` with these CELERIAC_* settings and wait for /readyz."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = spawn(service_command(port), child_env(settings), workdir, f"service-{port}")
    service = Service(process.proc, process.log_path, url, backend, dict(settings))
    try:
        wait_ready(service)
    except BaseException:
        service.stop()
        raise
    return service


def wait_ready(service: Service, timeout: float = READY_TIMEOUT) -> None:
    """Poll /readyz (no event exists for "a process is listening") with a deadline."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with httpx.Client(base_url=service.url, timeout=2.0) as client:
        while True:
            if service.proc.poll() is not None:
                pytest.fail(
                    f"the service exited with {service.proc.returncode} before it was ready:\n"
                    f"{service.log()}"
                )
            try:
                response = client.get("/readyz")
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text}"
            except httpx.TransportError as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the service at {service.url} was not ready within {timeout}s "
                    f"(last: {last}):\n{service.log()}"
                )
            time.sleep(0.1)


class Spawner:
    """Backends, services and other processes made inside a test (or module) and torn
    down with it, in reverse order."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._stack = contextlib.ExitStack()

    def backend(self, database: str, broker: str, *, redis_db: int = 0) -> Backend:
        return self._stack.enter_context(
            make_backend(database, broker, self.workdir, redis_db=redis_db)
        )

    def service(
        self, backend: Backend | None = None, extra: Mapping[str, str] | None = None
    ) -> Service:
        """A service on ``backend`` (default: a fresh sqlite-sql one) with the suite's
        short timers, plus ``extra`` settings."""
        backend = backend or self.backend("sqlite", "sql")
        settings = {**backend.env(), **SERVICE_TUNING, **(extra or {})}
        service = start_service(settings, self.workdir, backend=backend)
        self._stack.callback(service.stop)
        return service

    def replicas(self, backend: Backend, count: int) -> list[Service]:
        """``count`` services on one backend, started side by side (not one after another)."""
        settings = {**backend.env(), **SERVICE_TUNING}
        started = []
        for _ in range(count):
            port = free_port()
            process = spawn(
                service_command(port), child_env(settings), self.workdir, f"service-{port}"
            )
            service = Service(
                process.proc, process.log_path, f"http://127.0.0.1:{port}", backend, settings
            )
            self._stack.callback(service.stop)
            started.append(service)
        for service in started:
            wait_ready(service)
        return started

    def process(
        self, command: Sequence[str], name: str, env: Mapping[str, str] | None = None
    ) -> Process:
        process = spawn(command, child_env(env or {}), self.workdir, name)
        self._stack.callback(process.stop)
        return process

    def api(self, url: str, **kwargs: Any) -> Api:
        return self._stack.enter_context(Api(url, **kwargs))

    def close(self) -> None:
        self._stack.close()


# --- the HTTP helper --------------------------------------------------------------------


def expect(response: httpx.Response, status: int) -> Any:
    """Assert the status (showing the body when it differs) and return the JSON body."""
    assert response.status_code == status, (
        f"{response.request.method} {response.request.url.path} -> "
        f"{response.status_code}, expected {status}: {response.text}"
    )
    return response.json() if response.content else None


def assert_problem(
    response: httpx.Response, status: int, slug: str | None = None
) -> dict[str, Any]:
    """An RFC 9457 problem: the status, application/problem+json, type/title/status/detail."""
    assert response.status_code == status, (
        f"{response.request.method} {response.request.url.path} -> "
        f"{response.status_code}, expected {status}: {response.text}"
    )
    assert response.headers["content-type"].startswith("application/problem+json"), (
        response.headers.get("content-type")
    )
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["type"].startswith("urn:celeriac:problem:"), body
    if slug is not None:
        assert body["type"] == f"urn:celeriac:problem:{slug}", body
    return body


class Api:
    """httpx.Client bound to one service, with the calls the tests make most."""

    def __init__(self, base_url: str, *, headers: Mapping[str, str] | None = None) -> None:
        self.base_url = base_url
        # Long-polls hold requests for up to 30 s (leases) or 60 s (results).
        self.http = httpx.Client(base_url=base_url, headers=dict(headers or {}), timeout=75.0)

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # jobs
    def submit(self, **job: Any) -> dict[str, Any]:
        job.setdefault("task", "tests.noop")
        response = self.http.post("/jobs", json=job)
        body: dict[str, Any] = expect(response, 202)
        assert response.headers["location"] == f"/jobs/{body['id']}"
        return body

    def submit_batch(self, jobs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        specs = [{"task": "tests.noop", **job} for job in jobs]
        body = expect(self.http.post("/jobs/batch", json={"jobs": specs}), 202)
        return list(body["jobs"])

    def get(self, job_id: str, wait: float | None = None) -> dict[str, Any]:
        params = {} if wait is None else {"wait": wait}
        result: dict[str, Any] = expect(self.http.get(f"/jobs/{job_id}", params=params), 200)
        return result

    def list_jobs(self, **params: Any) -> dict[str, Any]:
        result: dict[str, Any] = expect(self.http.get("/jobs", params=params), 200)
        return result

    def queue_counts(self, queue: str) -> dict[str, int]:
        for entry in expect(self.http.get("/queues"), 200)["queues"]:
            if entry["name"] == queue:
                return dict(entry["counts"])
        return {}

    def total_jobs(self) -> int:
        queues = expect(self.http.get("/queues"), 200)["queues"]
        return sum(sum(entry["counts"].values()) for entry in queues)

    def cancel(self, job_id: str) -> httpx.Response:
        return self.http.post(f"/jobs/{job_id}/cancel")

    def retry(self, job_id: str) -> httpx.Response:
        return self.http.post(f"/jobs/{job_id}/retry")

    # worker protocol
    def lease(
        self,
        queues: str | Sequence[str],
        max_jobs: int = 1,
        wait: float = 0.0,
        *,
        worker: str = "test-worker",
        lease_seconds: float | None = None,
    ) -> list[dict[str, Any]]:
        body: dict[str, Any] = {
            "worker": worker,
            "queues": [queues] if isinstance(queues, str) else list(queues),
            "max_jobs": max_jobs,
            "wait": wait,
        }
        if lease_seconds is not None:
            body["lease_seconds"] = lease_seconds
        return list(expect(self.http.post("/leases", json=body), 200)["jobs"])

    def lease_one(
        self, queue: str | Sequence[str], wait: float = 5.0, **kwargs: Any
    ) -> dict[str, Any]:
        jobs = self.lease(queue, 1, wait, **kwargs)
        assert len(jobs) == 1, f"expected a job from {queue} within {wait}s, got {jobs}"
        return jobs[0]

    def heartbeat(self, leased: Mapping[str, Any], **body: Any) -> httpx.Response:
        body["token"] = leased["lease"]["token"]
        return self.http.post(f"/jobs/{leased['id']}/heartbeat", json=body)

    def complete(self, leased: Mapping[str, Any], result: Any = None) -> httpx.Response:
        token = leased["lease"]["token"]
        return self.http.post(
            f"/jobs/{leased['id']}/complete", json={"token": token, "result": result}
        )

    def fail(
        self,
        leased: Mapping[str, Any],
        error_type: str = "Boom",
        message: str = "it broke",
        **extra: Any,
    ) -> httpx.Response:
        body = {
            "token": leased["lease"]["token"],
            "error": {"type": error_type, "message": message},
            **extra,
        }
        return self.http.post(f"/jobs/{leased['id']}/fail", json=body)

    def release(self, leased: Mapping[str, Any]) -> httpx.Response:
        token = leased["lease"]["token"]
        return self.http.post(f"/jobs/{leased['id']}/release", json={"token": token})

    # waiting
    def wait_finished(self, job_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """One long-poll: the service answers the moment the job finishes."""
        job = self.get(job_id, wait=timeout)
        assert job["status"] in FINISHED, f"job {job_id} not finished within {timeout}s: {job}"
        return job

    def wait_for(
        self,
        predicate: Callable[..., Any],
        timeout: float = 10.0,
        *,
        job_id: str | None = None,
        what: str = "the condition",
        slice_seconds: float = 0.25,
    ) -> Any:
        """Wait until ``predicate`` holds. With ``job_id`` it is given the job, read with
        ``GET /jobs/{id}?wait=`` so a finish wakes us at once; other states (no event
        exists for them) are re-read every ``slice_seconds`` until the deadline. Without
        ``job_id`` it is called with no arguments and its truthy result returned."""
        deadline = time.monotonic() + timeout
        while True:
            started = time.monotonic()
            if job_id is not None:
                remaining = max(0.0, min(slice_seconds, deadline - started))
                value = self.get(job_id, wait=remaining)
                holds = bool(predicate(value))
            else:
                value = predicate()
                holds = bool(value)
            if holds:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}; last: {value!r}"
                )
            if time.monotonic() - started < 0.05:  # the read did not wait: don't spin
                time.sleep(0.05)


# --- pytest wiring ----------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "brokers(*names): run a backend-matrix test only on these brokers (sql, redis, amqp)",
    )
    config.addinivalue_line(
        "markers",
        "first_backend_only: run a backend-matrix test only on the first selected backend "
        "(that its brokers marker allows)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect matrix tests whose backend's broker is not one their ``brokers`` marker
    names (and ``first_backend_only`` tests on all but the first backend allowed), and
    mark every matrix test ``backends``."""
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get("backend") if callspec is not None else None
        if name is None:
            keep.append(item)
            continue
        item.add_marker(pytest.mark.backends)
        marker = item.get_closest_marker("brokers")
        allowed = [
            backend
            for backend in SELECTED_BACKENDS
            if marker is None or backend.split("-")[1] in marker.args
        ]
        if item.get_closest_marker("first_backend_only") is not None:
            allowed = allowed[:1]
        (keep if name in allowed else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test shows the tail of its service's log next to the traceback."""
    report = yield
    if report.failed:
        funcargs = getattr(item, "funcargs", {})
        running = funcargs.get("service")
        if isinstance(running, Service):
            report.sections.append((f"service log ({running.url})", running.log(4000)))
    return report


@pytest.fixture(scope="session", params=SELECTED_BACKENDS)
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    database, broker = str(request.param).split("-")
    workdir = tmp_path_factory.mktemp(str(request.param))
    with make_backend(database, broker, workdir) as made:
        yield made


@pytest.fixture(scope="session")
def service(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One real service process per backend for the whole session."""
    workdir = tmp_path_factory.mktemp(f"service-{backend.name}")
    started = start_service({**backend.env(), **SERVICE_TUNING}, workdir, backend=backend)
    try:
        yield started
    finally:
        code = started.stop()
        # SIGTERM is a clean shutdown: anything else means the service crashed or hung.
        assert code in (0, -signal.SIGTERM), f"service exited {code}:\n{started.log(30000)}"


@pytest.fixture
def api(service: Service) -> Iterator[Api]:
    with Api(service.url) as client:
        yield client


@pytest.fixture
def queue() -> str:
    """A queue name no other test uses."""
    return f"q_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def spawner(tmp_path: Path) -> Iterator[Spawner]:
    made = Spawner(tmp_path)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def module_spawner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spawner]:
    made = Spawner(tmp_path_factory.mktemp("module"))
    try:
        yield made
    finally:
        made.close()
