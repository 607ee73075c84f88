"""The service's HTTP protocol (service/http_server.py): a response's head and body leave
in one send, and a client that closes its half of the connection still gets its answer.
Through a real ``celeriac serve`` on a raw socket, and the transport wrapper on its own
against a transport that records what it was asked to send."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from typing import Any

import pytest
from conftest import Api, Service, Spawner, expect

from service.http_server import OneSendPerTurn


@pytest.fixture(scope="module")
def served(module_spawner: Spawner) -> Service:
    return module_spawner.service()


def _split(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise AssertionError(f"no content-length in {head!r}")


def test_a_response_arrives_whole_in_one_read(served: Service) -> None:
    """Uvicorn writes a head and a body separately; sent apart, a client blocked in
    ``recv`` could wake for the head alone. Sent together, the first read holds both, on
    every request of a kept-alive connection."""
    with socket.create_connection(_split(served.url), timeout=10) as sock:
        for _ in range(200):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            first = sock.recv(65536)
            head, _, body = first.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), first[:200]
            assert len(body) == _content_length(head), first


def test_pipelined_requests_are_answered_in_order(served: Service) -> None:
    """Two requests in one send: two whole responses, in the order asked."""
    with socket.create_connection(_split(served.url), timeout=10) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /no-such-route HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        received = b""
        statuses: list[bytes] = []
        while len(statuses) < 2:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {received!r}"
            received += chunk
            while b"\r\n\r\n" in received:
                head, _, rest = received.partition(b"\r\n\r\n")
                length = _content_length(head)
                if len(rest) < length:
                    break
                statuses.append(head.split(b" ", 2)[1])
                received = rest[length:]
        assert statuses == [b"200", b"404"]


def _post(path: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode() + data


def _answer_then_close(sock: socket.socket) -> tuple[bytes, Any]:
    """Read one whole response, then the end of the connection: (head, JSON body)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head, "the connection closed without an answer"
    assert len(body) == _content_length(head), received
    return head, json.loads(body)


def test_a_client_that_closes_its_half_still_gets_its_answer(served: Service) -> None:
    """``shutdown(SHUT_WR)`` right after a request: the answer still arrives whole, then
    the connection closes (it used to close at once, the answer lost)."""
    queue = f"q_{uuid.uuid4().hex[:8]}"
    with socket.create_connection(_split(served.url), timeout=10) as sock:
        sock.sendall(_post("/jobs", {"task": "half.closed", "queue": queue}))
        sock.shutdown(socket.SHUT_WR)
        head, job = _answer_then_close(sock)
    assert head.startswith(b"HTTP/1.1 202"), job
    assert b"\r\nconnection: close" in head.lower(), head  # the service's half follows
    with Api(served.url) as api:
        assert expect(api.http.get(f"/jobs/{job['id']}"), 200)["queue"] == queue


def test_a_grant_at_the_moment_its_long_poll_is_left_is_never_lost(served: Service) -> None:
    """A worker ending its long-poll (SHUT_WR) just as a job arrives for it: either the
    service sees it gone and hands the job back, or the answer carries the grant and
    the worker hands it back. Never a lease that nobody holds, which used to keep the
    job until its deadline and then run it again (a restart under load lost none, but
    ran some twice)."""
    queue = f"q_{uuid.uuid4().hex[:8]}"
    poll_body = {"worker": "leaving", "queues": [queue], "max_jobs": 1, "wait": 20}
    granted = 0
    with Api(served.url) as api:
        for attempt in range(40):
            with (
                socket.create_connection(_split(served.url), timeout=10) as poll,
                socket.create_connection(_split(served.url), timeout=10) as submit,
            ):
                poll.sendall(_post("/leases", poll_body))
                submit.sendall(_post("/jobs", {"task": "t.x", "queue": queue}))
                submit.shutdown(socket.SHUT_WR)
                time.sleep(attempt * 0.0001)  # the leaving swept across the grant's moment
                poll.shutdown(socket.SHUT_WR)
                head, answer = _answer_then_close(poll)
                _, job = _answer_then_close(submit)
            assert head.startswith(b"HTTP/1.1 200"), answer
            for leased in answer["jobs"]:  # the worker's part: hand back what it got
                granted += 1
                token = leased["lease"]["token"]
                expect(api.http.post(f"/jobs/{leased['id']}/release", json={"token": token}), 200)
            assert expect(api.http.get(f"/jobs/{job['id']}"), 200)["status"] == "queued"
            expect(api.http.post(f"/jobs/{job['id']}/cancel"), 200)
    print(f"{granted} of 40 answers carried the grant")


class RecordingTransport(asyncio.Transport):
    """What ``OneSendPerTurn`` hands on, each call as it came."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: Any) -> None:
        assert not self.closed, "written after close"
        self.sent.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0


def _wrapped() -> tuple[RecordingTransport, OneSendPerTurn]:
    inner = RecordingTransport()
    return inner, OneSendPerTurn(inner, asyncio.get_running_loop())


def test_a_head_and_its_body_go_in_one_write() -> None:
    async def scenario() -> None:
        inner, outer = _wrapped()
        outer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        assert inner.sent == []  # held for the body
        assert outer.get_write_buffer_size() > 0
        outer.write(b"ok")
        assert inner.sent == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
        await asyncio.sleep(0)
        assert len(inner.sent) == 1  # nothing left for the turn's end

    asyncio.run(scenario())


def test_a_lone_write_leaves_at_the_end_of_the_turn_and_order_holds() -> None:
    async def scenario() -> None:
        inner, outer = _wrapped()
        outer.write(b"a")
        assert inner.sent == []
        await asyncio.sleep(0)
        assert inner.sent == [b"a"]
        outer.writelines([b"b", b"c", b"d"])  # a chunked body: head, chunk, then the end
        await asyncio.sleep(0)
        assert inner.sent == [b"a", b"bc", b"d"]

    asyncio.run(scenario())


def test_close_sends_what_is_pending_and_abort_drops_it() -> None:
    async def scenario() -> None:
        inner, outer = _wrapped()
        outer.write(b"bye")
        outer.close()
        assert inner.sent == [b"bye"] and inner.closed
        await asyncio.sleep(0)  # the turn's flush finds nothing, and writes nothing
        assert inner.sent == [b"bye"]

        inner, outer = _wrapped()
        outer.write(b"lost")
        outer.abort()
        await asyncio.sleep(0)
        assert inner.sent == [] and inner.aborted

    asyncio.run(scenario())


def test_a_write_pending_when_the_connection_closes_is_dropped() -> None:
    async def scenario() -> None:
        inner, outer = _wrapped()
        outer.write(b"late")
        inner.close()  # the peer went away before the turn ended
        await asyncio.sleep(0)
        assert inner.sent == []
        assert outer.is_closing()

    asyncio.run(scenario())
