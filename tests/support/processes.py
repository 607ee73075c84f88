"""Real processes under test: spawn and stop them, start ``celeriac serve`` and wait
until it is ready, and the Spawner that tears down what a test made, in reverse order."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.api import Api
from support.backends import Backend, make_backend

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]

# Short timers so leases expire, retries come due and the index is repaired quickly.
SERVICE_TUNING = {
    "CELERIAC_RECONCILE_INTERVAL_SECONDS": "0.3",
    "CELERIAC_DEFAULT_LEASE_SECONDS": "2",
    "CELERIAC_SQL_POLL_FALLBACK_SECONDS": "0.2",
    "CELERIAC_LOG_LEVEL": "warning",
}
READY_TIMEOUT = 30.0


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
