"""Issue 14: the SDK's hand-written HTTP/1.1 exchange (``celeriac._wire``), against a raw
socket server that answers in the forms HTTP allows: a Content-Length, chunks with
extensions and trailers, an answer that ends with the connection, a 100 Continue first, a
connection the server closes. Each request goes out whole, in one write; a header value
or a target that would smuggle a line in is refused before anything is sent."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from celeriac._http import HttpSession
from celeriac._wire import Connection, render_headers
from celeriac.errors import CeleriacError, ServerUnreachable

OK = b'{"ok":true}'


class Scripted:
    """A loopback server that reads each request and sends the next scripted answer."""

    def __init__(self, answers: list[bytes]) -> None:
        self.answers = answers
        self.requests: list[bytes] = []
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.answers:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                self._converse(conn)

    def _converse(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        while self.answers:
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                line = reader.readline()
                if not line:
                    return
                head += line
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            self.requests.append(head + reader.read(length))
            answer = self.answers.pop(0)
            conn.sendall(answer)
            if b"connection: close" in answer.lower():
                return

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def scripted() -> Iterator[type[Scripted]]:
    made: list[Scripted] = []

    def make(answers: list[bytes]) -> Scripted:
        server = Scripted(answers)
        made.append(server)
        return server

    yield make  # type: ignore[misc]
    for server in made:
        server.close()


def _session(server: Scripted) -> HttpSession:
    return HttpSession(f"http://127.0.0.1:{server.port}", "k" * 30, timeout=5)


def test_answers_in_every_framing_over_one_connection(scripted: type[Scripted]) -> None:
    server = scripted(
        [
            b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\n"
            b"Content-Length: 11\r\n\r\n" + OK,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\n" + OK[:5] + b"\r\n6\r\n" + OK[5:] + b"\r\n0\r\nX-Trailer: y\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n" + OK,
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + OK,
        ]
    )
    session = _session(server)
    try:
        assert session.call("POST", "/jobs", b'{"task":"t"}', headers={"Idempotency-Key": "k1"})
        assert session.call("GET", "/jobs/x") == {"ok": True}
        assert session.call("GET", "/jobs/y") == {"ok": True}
        assert session.call("DELETE", "/workers/w") is None
        assert session.call("GET", "/queues") == {"ok": True}  # read to the end
    finally:
        session.close()
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nIdempotency-Key: k1\r\n" in first
    assert b"\r\nAuthorization: Bearer " + b"k" * 30 + b"\r\n" in first
    assert first.endswith(b'Content-Length: 12\r\nAccept-Encoding: identity\r\n\r\n{"task":"t"}')
    assert b"Content-Length" not in server.requests[1]
    assert b"\r\nContent-Length: 0\r\n" not in server.requests[3]


def test_error_answers_and_a_closed_connection(scripted: type[Scripted]) -> None:
    problem = b'{"title":"Conflict","detail":"stale token"}'
    server = scripted(
        [
            b"HTTP/1.1 409 Conflict\r\nContent-Type: application/problem+json\r\n"
            b"Retry-After: 3\r\nContent-Length: %d\r\n\r\n" % len(problem) + problem,
            b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\nConnection: close\r\n\r\n" + OK,
        ]
    )
    session = _session(server)
    try:
        with pytest.raises(CeleriacError) as refused:
            session.call("POST", "/jobs/x/complete", b"{}")
        assert (refused.value.status, refused.value.detail) == (409, "stale token")
        assert refused.value.retry_after == 3
        with pytest.raises(ServerUnreachable, match="IncompleteRead"):
            session.call("GET", "/jobs/x", resend=False)
    finally:
        session.close()


def test_a_line_cannot_be_smuggled_into_the_request() -> None:
    for value in ("a\r\nX-Evil: 1", "a\nb", "a\x00"):
        with pytest.raises(ValueError, match="header value"):
            render_headers({"Idempotency-Key": value})
    with pytest.raises(ValueError, match="header name"):
        render_headers({"Bad Name": "v"})
    conn = Connection("127.0.0.1", 9, https=False, timeout=1)
    conn.sock = socket.socket()  # never used: the target is refused first
    try:
        for target in ("/jobs x", "/jobs\r\nX: 1", "/jobs\x7f"):
            with pytest.raises(ValueError, match="control characters"):
                conn.exchange("GET", target, None, b"")
        with pytest.raises(ValueError, match="method"):
            conn.exchange("GET /x HTTP/1.1\r\n", "/", None, b"")
    finally:
        conn.close()
