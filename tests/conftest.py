"""The pytest hooks and fixtures: the backend matrix as a session fixture, one real
service process per backend, a unique queue per test, and spawners for what a test
starts itself.

Every backend gets a fresh database built only by migrating, a Redis key prefix of its
own, and ONE real ``celeriac serve`` process for the whole session: tests isolate
themselves with unique queue names (the ``queue`` fixture). The matrix, the loopback
services and provisioning live in ``support/backends.py``, process control in
``support/processes.py``, the HTTP helper in ``support/api.py``; their names are
re-exported here so that test modules import them all from ``conftest``.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.api import FINISHED, Api, assert_problem, expect
from support.backends import (
    ALL_BACKENDS,
    AMQP_HOST,
    AMQP_PORT,
    BROKERS,
    DATABASES,
    DEFAULT_BACKENDS,
    IN_CI,
    MARIADB_ADMIN,
    MARIADB_URL,
    PG_ADMIN_DSN,
    PG_URL,
    REDIS_HOST,
    REDIS_PORT,
    SELECTED_BACKENDS,
    Backend,
    amqp_url,
    amqp_vhost,
    delete_redis_prefix,
    fresh_database,
    make_backend,
    migrated_database,
    rabbitmqctl,
    redis_client,
    require_available,
    selected_backends,
    selected_databases,
    unavailable,
    unique_name,
)
from support.processes import (
    READY_TIMEOUT,
    REPO,
    SERVICE_TUNING,
    TESTS,
    Process,
    Service,
    Spawner,
    child_env,
    free_port,
    service_command,
    spawn,
    start_service,
    stop_process,
    wait_ready,
)

# What test modules import from here (``from conftest import Api, Spawner, ...``).
__all__ = [
    "ALL_BACKENDS",
    "AMQP_HOST",
    "AMQP_PORT",
    "BROKERS",
    "DATABASES",
    "DEFAULT_BACKENDS",
    "FINISHED",
    "IN_CI",
    "MARIADB_ADMIN",
    "MARIADB_URL",
    "PG_ADMIN_DSN",
    "PG_URL",
    "READY_TIMEOUT",
    "REDIS_HOST",
    "REDIS_PORT",
    "REPO",
    "SELECTED_BACKENDS",
    "SERVICE_TUNING",
    "TESTS",
    "Api",
    "Backend",
    "Process",
    "Service",
    "Spawner",
    "amqp_url",
    "amqp_vhost",
    "assert_problem",
    "child_env",
    "delete_redis_prefix",
    "expect",
    "free_port",
    "fresh_database",
    "make_backend",
    "migrated_database",
    "rabbitmqctl",
    "redis_client",
    "require_available",
    "selected_backends",
    "selected_databases",
    "service_command",
    "spawn",
    "start_service",
    "stop_process",
    "unavailable",
    "unique_name",
    "wait_ready",
]


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
    config.addinivalue_line(
        "markers",
        "only_backends(*names): run a backend-matrix test only on these backends (the "
        "database-and-broker pairs a feature's behaviour depends on; keeps the suite short)",
    )


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadscope`` (``make test``): a module per process at a time, RabbitMQ's
    tests together, the longest modules first (tests/support/parallel.py)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from support.parallel import ModuleScheduling

    return ModuleScheduling(config, log)


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
        only = item.get_closest_marker("only_backends")
        if only is not None:
            allowed = [backend for backend in allowed if backend in only.args]
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
