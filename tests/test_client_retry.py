"""Issue 12, finding 11: the producer clients ride out a blip without duplicates.

A ``.delay()`` loop keeps working through a 3-second service restart on the same port
and database, and the database holds exactly the jobs that were acknowledged; a submit
whose answer is lost (a loopback proxy that forwards the request, lets the service commit,
then closes the client's connection instead of relaying the answer) is retried with the
same automatic ``Idempotency-Key`` and leaves one job; a batch, which has no key, is not
sent again after that; ``retries=0`` fails at once; the Node client does the same.
Real services, a real proxy, real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import pytest
import sqlalchemy as sa
from celeriac import AsyncClient, Celeriac, Client, ConnectFailed, ServerUnreachable
from conftest import (
    REPO,
    TESTS,
    Backend,
    Service,
    Spawner,
    child_env,
    free_port,
    service_command,
    unavailable,
    wait_ready,
)

KEY_HEADER = re.compile(rb"^idempotency-key:\s*(\S+)\s*$", re.IGNORECASE | re.MULTILINE)


# --- a proxy that loses answers -----------------------------------------------------------


@dataclass
class Exchange:
    request_line: str
    key: str | None
    status: int
    replayed: bool
    lost: bool


def _read_message(stream: BinaryIO) -> bytes | None:
    """One HTTP/1.1 message (head and Content-Length body); None at end of stream."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = stream.readline(65536)
        if not line:
            return None
        head += line
    if re.search(rb"^transfer-encoding:\s*chunked", head, re.IGNORECASE | re.MULTILINE):
        return head + _read_chunks(stream)
    match = re.search(rb"^content-length:\s*(\d+)", head, re.IGNORECASE | re.MULTILINE)
    body = stream.read(int(match.group(1))) if match else b""
    return head + body


def _read_chunks(stream: BinaryIO) -> bytes:
    body = b""
    while True:
        size_line = stream.readline(65536)
        body += size_line
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            break
        body += stream.read(size + 2)  # the chunk and its CRLF
    while (trailer := stream.readline(65536)) not in (b"\r\n", b""):
        body += trailer
    return body + b"\r\n"


@dataclass
class LossyProxy:
    """Forwards HTTP/1.1 requests on loopback to ``upstream`` and relays the answers, but
    closes the client's connection instead of relaying the answer to the first attempt of
    each Idempotency-Key, and to every request without one. The service has answered (so
    committed) by then: only the answer is lost. ``lossy=False`` relays everything."""

    upstream: int
    port: int = 0
    lossy: bool = True
    exchanges: list[Exchange] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _sockets: list[socket.socket] = field(default_factory=list)

    def start(self) -> LossyProxy:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError), client:
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            with upstream, client.makefile("rb") as from_client, upstream.makefile("rb") as back:
                while (request := _read_message(from_client)) is not None:
                    upstream.sendall(request)
                    response = _read_message(back)
                    if response is None or self._record(request, response):
                        return  # closing the client's connection: the answer is lost
                    client.sendall(response)

    def _record(self, request: bytes, response: bytes) -> bool:
        found = KEY_HEADER.search(request.split(b"\r\n\r\n", 1)[0])
        key = found.group(1).decode() if found else None
        with self._lock:
            lose = self.lossy and (key is None or key not in self._seen)
            if key is not None:
                self._seen.add(key)
            self.exchanges.append(
                Exchange(
                    request_line=request.split(b"\r\n", 1)[0].decode(),
                    key=key,
                    status=int(response.split(b" ", 2)[1]),
                    replayed=b"idempotent-replayed: true" in response.lower(),
                    lost=lose,
                )
            )
        return lose


@pytest.fixture(scope="module")
def shared(module_spawner: Spawner) -> tuple[Service, Backend]:
    """One SQLite service for the tests that do not stop it; they isolate by queue."""
    backend = module_spawner.backend("sqlite", "sql")
    return module_spawner.service(backend), backend


@pytest.fixture
def own(spawner: Spawner) -> tuple[Service, Backend]:
    """A service of the test's own, to stop and start again."""
    backend = spawner.backend("sqlite", "sql")
    return spawner.service(backend), backend


@pytest.fixture
def proxy(shared: tuple[Service, Backend]) -> Iterator[LossyProxy]:
    service, _ = shared
    made = LossyProxy(int(service.url.rsplit(":", 1)[1])).start()
    try:
        yield made
    finally:
        made.close()


def stored(backend: Backend, queue: str) -> list[str]:
    """The ids of the queue's jobs, straight from the database."""
    engine = sa.create_engine(backend.database_url)
    try:
        with engine.connect() as connection:
            query = sa.text("SELECT id FROM jobs WHERE queue = :queue")
            return [str(row[0]) for row in connection.execute(query, {"queue": queue})]
    finally:
        engine.dispose()


# --- a restart under a .delay() loop ------------------------------------------------------


@dataclass
class Submitter:
    """Calls ``.delay()`` in a loop on its own thread, as a web request handler would."""

    task: Any
    queue: str
    ids: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    slowest: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)
    progress: threading.Condition = field(default_factory=threading.Condition)

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                handle = self.task.apply_async((len(self.ids),), queue=self.queue)
            except BaseException as exc:
                self.errors.append(exc)
                return
            with self.progress:
                self.slowest = max(self.slowest, time.monotonic() - started)
                self.ids.append(handle.id)
                self.progress.notify_all()

    def wait_for(self, count: int, timeout: float = 30.0) -> None:
        with self.progress:
            done = self.progress.wait_for(
                lambda: len(self.ids) >= count or bool(self.errors), timeout
            )
        assert done and not self.errors, f"{len(self.ids)} submitted; errors: {self.errors}"


def restart(service: Service, spawner: Spawner, how: str) -> Service:
    """Stop the service, leave the port closed 3 s, start it again on the same port and
    database."""
    if how == "kill":
        service.kill()
    else:
        service.stop()
    time.sleep(3.0)  # the outage itself, not a wait for an event
    port = int(service.url.rsplit(":", 1)[1])
    process = spawner.process(service_command(port), f"service-again-{port}", service.settings)
    again = Service(process.proc, process.log_path, service.url, service.backend, service.settings)
    wait_ready(again)
    return again


@pytest.mark.parametrize("how", ["term", "kill"])
def test_delay_rides_out_a_3_second_restart_without_duplicates(
    spawner: Spawner, own: tuple[Service, Backend], queue: str, how: str
) -> None:
    service, backend = own
    app = Celeriac("restart", server=service.url)

    @app.task(name="tests.noop")
    def noop(n: int) -> int:
        return n

    submitters = [Submitter(noop, queue) for _ in range(2)]
    threads = [threading.Thread(target=s.run, daemon=True) for s in submitters]
    try:
        for thread in threads:
            thread.start()
        for submitter in submitters:
            submitter.wait_for(20)
        before = [len(s.ids) for s in submitters]
        restart(service, spawner, how)
        for submitter, count in zip(submitters, before, strict=True):
            submitter.wait_for(count + 20)
    finally:
        for submitter in submitters:
            submitter.stop.set()
        for thread in threads:
            thread.join(30)
        app.close()

    acknowledged = [job_id for s in submitters for job_id in s.ids]
    assert not [s.errors for s in submitters if s.errors]
    # Some .delay() call was in flight across the outage and waited it out.
    assert max(s.slowest for s in submitters) > 2.5
    in_db = stored(backend, queue)
    assert len(in_db) == len(set(in_db)) == len(acknowledged)
    assert set(in_db) == set(acknowledged)


# --- a lost answer ------------------------------------------------------------------------


def test_a_submit_whose_answer_is_lost_is_retried_into_one_job(
    proxy: LossyProxy, shared: tuple[Service, Backend], queue: str
) -> None:
    _, backend = shared
    with Client(proxy.url) as client:
        job = client.submit("tests.noop", [1], queue=queue)

    first, second = proxy.exchanges
    assert first.request_line.startswith("POST /jobs ") and first.lost
    assert (first.status, first.replayed) == (202, False)
    assert first.key is not None and second.key == first.key  # generated, kept on retry
    assert (second.status, second.replayed, second.lost) == (200, True, False)
    assert stored(backend, queue) == [job["id"]]


def test_the_async_client_retries_a_lost_answer_into_one_job(
    proxy: LossyProxy, shared: tuple[Service, Backend], queue: str
) -> None:
    _, backend = shared

    async def submit() -> dict[str, Any]:
        async with AsyncClient(proxy.url) as client:
            return await client.submit("tests.noop", [1], queue=queue)

    job = asyncio.run(submit())
    assert [(e.status, e.replayed) for e in proxy.exchanges] == [(202, False), (200, True)]
    assert stored(backend, queue) == [job["id"]]


def test_a_caller_key_is_used_as_is(
    proxy: LossyProxy, shared: tuple[Service, Backend], queue: str
) -> None:
    _, backend = shared
    app = Celeriac("keys", server=proxy.url)
    try:
        handle = app.send_task("tests.noop", [1], queue=queue, idempotency_key="invoice-42")
        again = app.send_task("tests.noop", [1], queue=queue, idempotency_key="invoice-42")
    finally:
        app.close()
    assert [e.key for e in proxy.exchanges] == ["invoice-42"] * 3
    assert again.id == handle.id
    assert stored(backend, queue) == [handle.id]


def test_a_batch_is_not_sent_again_once_it_may_have_arrived(
    proxy: LossyProxy, shared: tuple[Service, Backend], queue: str
) -> None:
    _, backend = shared
    batch = [{"task": "tests.noop", "queue": queue}] * 3
    with Client(proxy.url) as client, pytest.raises(ServerUnreachable) as raised:
        client.submit_batch(batch)
    assert not isinstance(raised.value, ConnectFailed)
    assert [e.request_line.split()[:2] for e in proxy.exchanges] == [["POST", "/jobs/batch"]]
    assert len(stored(backend, queue)) == 3  # committed once; the caller was told it is unknown


class _FirstRetry(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.set()


def test_a_batch_refused_a_connection_is_sent_once_the_service_listens(
    shared: tuple[Service, Backend], queue: str
) -> None:
    service, backend = shared
    port = free_port()  # nothing listens there yet: connections are refused
    watcher = _FirstRetry()
    logger = logging.getLogger("celeriac.client")
    level = logger.level
    logger.addHandler(watcher)
    logger.setLevel(logging.INFO)
    late = LossyProxy(int(service.url.rsplit(":", 1)[1]), port=port, lossy=False)
    result: list[Any] = []

    def submit() -> None:
        with Client(f"http://127.0.0.1:{port}") as client:
            try:
                result.append(client.submit_batch([{"task": "tests.noop", "queue": queue}] * 2))
            except BaseException as exc:
                result.append(exc)

    thread = threading.Thread(target=submit)
    try:
        thread.start()
        assert watcher.seen.wait(10), "the client never retried the refused batch"
        late.start()
        thread.join(15)
    finally:
        logger.removeHandler(watcher)
        logger.setLevel(level)
        late.close()
    assert isinstance(result[0], list) and len(result[0]) == 2, result
    assert len(stored(backend, queue)) == 2


# --- retries off --------------------------------------------------------------------------


def test_retries_0_fails_at_once_and_sends_no_key(
    proxy: LossyProxy, shared: tuple[Service, Backend], queue: str
) -> None:
    _, backend = shared
    with Client(proxy.url, retries=0) as client, pytest.raises(ServerUnreachable):
        client.submit("tests.noop", [1], queue=queue)
    assert [(e.key, e.lost) for e in proxy.exchanges] == [(None, True)]
    assert len(stored(backend, queue)) == 1  # committed; the answer was lost, not resent


def test_the_environment_turns_retries_off(monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("CELERIAC_CLIENT_RETRIES", "0")
    app = Celeriac("off", server=dead)

    @app.task(name="tests.noop")
    def noop() -> None:
        return None

    started = time.monotonic()
    with pytest.raises(ConnectFailed):
        noop.delay()
    assert time.monotonic() - started < 2.0  # retrying, it would take the 10 s budget
    app.close()


def test_retries_stop_within_the_budget() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with Client(dead, retry_budget=1.0) as client, pytest.raises(ConnectFailed):
        client.get("0190c6a0-0000-7000-8000-000000000000")
    assert 0.5 < time.monotonic() - started < 3.0  # the default budget is 10 s


# --- the Node client ----------------------------------------------------------------------

NODE = shutil.which("node")


def test_the_node_client_retries_a_lost_answer_into_one_job(
    proxy: LossyProxy, shared: tuple[Service, Backend], queue: str
) -> None:
    if NODE is None:
        unavailable("node is not installed: the Node.js client test needs Node 20+")
    _, backend = shared
    env = child_env({"CELERIAC_SERVER_URL": proxy.url, "TEST_QUEUE": queue})
    done = subprocess.run(
        [NODE or "node", str(TESTS / "node" / "lost_response.mjs")],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, f"node exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    out = json.loads(done.stdout.strip().splitlines()[-1])

    submit, replay, batch, off = proxy.exchanges
    assert submit.key is not None and replay.key == submit.key and submit.lost
    assert (replay.status, replay.replayed, replay.lost) == (200, True, False)
    assert batch.request_line.startswith("POST /jobs/batch") and batch.lost  # not resent
    assert out["batch"]["status"] is None and out["batch"]["notSent"] is False
    assert off.key is None and off.lost and out["off"]["status"] is None  # retries: 0
    ids = stored(backend, queue)
    assert len(ids) == 1 + 2 + 1 and out["submitted"] in ids
