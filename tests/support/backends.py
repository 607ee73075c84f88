"""The backend matrix and what each backend needs: the loopback services' availability,
fresh databases built only by migrating, Redis key prefixes and RabbitMQ vhosts.

The matrix is {sqlite, postgres, mariadb} x {sql, redis} broker, plus ``postgres-amqp``
(RabbitMQ; ``sqlite-amqp`` on request), ids like ``sqlite-sql`` or ``postgres-redis``;
restrict it with ``CELERIAC_TEST_BACKENDS=sqlite-sql,postgres-redis``.
PostgreSQL, MariaDB, Redis and RabbitMQ run on loopback; when one is unreachable its
backends are skipped locally and fail in CI (``CI=true``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from service.db import Database

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


def selected_databases() -> list[str]:
    """The databases that some selected backend uses, in the matrix's order."""
    return [d for d in DATABASES if any(b.startswith(f"{d}-") for b in SELECTED_BACKENDS)]


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


@contextlib.contextmanager
def migrated_database(kind: str, workdir: Path) -> Iterator[Database]:
    """A fresh database of ``kind``, migrated to head, for driving the domain in process
    (no service, no broker); its engine is disposed and the database dropped after."""
    from service.db import Database, create_engine

    with make_backend(kind, "sql", workdir) as backend:
        database = Database(create_engine(backend.database_url))
        try:
            yield database
        finally:
            database.dispose()
