"""Issue 16, item 7: ``GET /events``, Server-Sent Events of job state changes. A client
sees a job go queued -> running (with progress) -> succeeded; a finish on another replica
arrives where the broker announces it (Redis pub/sub); a stream holds a long-poll slot."""

from __future__ import annotations

import contextlib
import json
import queue as queues
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from conftest import Api, Backend, Service, Spawner, assert_problem, expect

EVENT_TIMEOUT = 10.0


class Stream:
    """An SSE client on a plain socket, read in a thread of its own (shutting the socket
    down ends the read at once): parsed events land in ``events``. HTTP/1.0, so the body
    comes unchunked."""

    def __init__(self, url: str, params: Mapping[str, Any]) -> None:
        self.events: queues.Queue[dict[str, Any]] = queues.Queue()
        self.subscribed = threading.Event()
        self.status: int | None = None
        address = httpx.URL(url)
        self._sock = socket.create_connection((address.host, address.port), timeout=30)
        self._sock.settimeout(None)
        target = f"/events?{urlencode(params, doseq=True)}"
        self._sock.sendall(f"GET {target} HTTP/1.0\r\nHost: {address.host}\r\n\r\n".encode())
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            lines = self._sock.makefile("rb")
            self.status = int(lines.readline().split()[1])
            while lines.readline().strip():  # the headers
                pass
            self.subscribed.set()  # (a refusal sets it too: status tells)
            kind = None
            for raw in lines:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event: "):
                    kind = line[len("event: ") :]
                elif line.startswith("data: ") and kind is not None:
                    self.events.put(json.loads(line[len("data: ") :]))
        except (OSError, ValueError):
            pass  # closed by the test
        finally:
            self.subscribed.set()

    def next(self, job_id: str | None = None) -> dict[str, Any]:
        """The next event (of ``job_id``), within EVENT_TIMEOUT."""
        while True:
            event = self.events.get(timeout=EVENT_TIMEOUT)
            if job_id is None or event.get("id") == job_id:
                return event

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # the service sees the client go
        self._sock.close()
        self._thread.join(5)
        assert not self._thread.is_alive()


@contextmanager
def stream(service: Service, **params: Any) -> Iterator[Stream]:
    opened = Stream(service.url, params)
    try:
        assert opened.subscribed.wait(EVENT_TIMEOUT), "the stream did not open"
        yield opened
    finally:
        opened.close()


def test_a_job_goes_queued_running_succeeded(service: Service, api: Api, queue: str) -> None:
    with stream(service, queue=queue) as events:
        assert events.status == 200
        other = api.submit(queue=queue + "-other")  # another queue: not in this stream
        job = api.submit(queue=queue)
        leased = api.lease_one(queue)
        expect(api.heartbeat(leased, progress={"done": 1, "of": 2}), 200)
        expect(api.complete(leased, result=42), 200)
        seen = [events.next(job["id"]) for _ in range(4)]
    assert [(e["event"], e["status"]) for e in seen] == [
        ("submitted", "queued"),
        ("started", "running"),
        ("progress", "running"),
        ("finished", "succeeded"),
    ], seen
    assert seen[2]["progress"] == {"done": 1, "of": 2}
    assert {e["queue"] for e in seen} == {queue} and seen[3]["attempt"] == 1
    assert other["id"] not in {e["id"] for e in seen}


@pytest.mark.brokers("redis")
@pytest.mark.first_backend_only
def test_a_finish_on_another_replica(
    backend: Backend, service: Service, spawner: Spawner, api: Api, queue: str
) -> None:
    """The stream is on a replica of its own; the job is submitted and settled through the
    session's service: its finish comes over Redis pub/sub, read back by id."""
    replica = spawner.service(backend)
    with stream(replica, queue=queue) as events:
        job = api.submit(queue=queue)
        expect(api.complete(api.lease_one(queue), result=1), 200)
        finished = events.next(job["id"])
    assert (finished["event"], finished["status"], finished["queue"]) == (
        "finished",
        "succeeded",
        queue,
    )


@pytest.mark.first_backend_only
def test_a_stream_holds_a_long_poll_slot(backend: Backend, spawner: Spawner, queue: str) -> None:
    capped = spawner.service(backend, {"CELERIAC_MAX_LONG_POLLS": "1"})
    with stream(capped, queue=queue) as first:
        assert first.status == 200
        refused = httpx.get(f"{capped.url}/events", timeout=10)
        problem = assert_problem(refused, 503, "too-many-long-polls")
        assert refused.headers["Retry-After"] and "CELERIAC_MAX_LONG_POLLS" in problem["detail"]
    # The slot comes back as soon as the service hears the first client go.
    deadline = time.monotonic() + EVENT_TIMEOUT
    while True:
        with stream(capped, queue=queue) as again:
            if again.status == 200:
                break
        assert time.monotonic() < deadline, "the first stream's slot was never given back"
        time.sleep(0.05)
