"""Shared bench plumbing: fresh databases, free ports, readiness waits."""

from __future__ import annotations

import socket
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

import httpx
import sqlalchemy as sa


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(base: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{base} did not become ready")


@contextmanager
def fresh_database(url: str) -> Iterator[str]:
    """A new, migrated database beside the one named (SQLite: a new file)."""
    from service.migrate import upgrade

    if url.startswith("sqlite"):
        path = f"/tmp/celeriac-bench-{uuid.uuid4().hex[:8]}.db"
        upgrade(f"sqlite:///{path}")
        yield f"sqlite:///{path}"
        return
    name = f"celeriac_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    target = sa.make_url(url).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(target)
        yield target
    finally:
        with admin.connect() as conn:
            force = " WITH (FORCE)" if admin.dialect.name == "postgresql" else ""
            conn.exec_driver_sql(f"DROP DATABASE {name}{force}")
        admin.dispose()
