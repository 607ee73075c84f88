"""The SDK's own HTTP client (``Client`` and the worker): one persistent connection per thread.

The worker makes the same few calls (lease, heartbeat, report, registry) thousands of times
a minute, and a producer calls ``delay()`` from its request threads: at low concurrency a
request's client-side CPU is a large part of a call's cost. It was about 1 ms with httpx,
about 200 microseconds with ``http.client``, and is a few tens here: each request goes out
in one write and its answer is read by ``_wire.Connection``. Each calling thread (leaser,
heartbeat, reporter, registry, a web app's request threads) gets its own connection,
because a connection carries one request at a time. Same errors as ``Client``: an error
answer raises ``CeleriacError``, no answer ``ServerUnreachable`` (``ConnectFailed`` when
the connection could not be opened, so nothing was sent). The session itself retries
nothing but a kept-alive connection the service had closed; ``Client`` adds its retries
(_retry.py) on top, and the worker runtime has its own.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
import threading
from typing import Any
from urllib.parse import urlsplit

from ._retry import parse_retry_after
from ._wire import Answer, Connection, render_headers
from .client import resolve_api_key, resolve_server
from .errors import CeleriacError, ConnectFailed, ServerUnreachable

# The service closes idle keep-alive connections (uvicorn: after 5 s); a request that
# finds its connection closed that way is sent again once, on a new one.
STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class HttpSession:
    """``call(method, path, body)`` → the decoded JSON answer."""

    def __init__(
        self,
        server: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        user_agent: str = "celeriac-python-worker",
    ) -> None:
        self.server = resolve_server(server)
        parts = urlsplit(self.server)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the server URL must be http(s)://host[:port], not {self.server!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._timeout = timeout
        self._headers = {
            "Accept": "application/json",
            "Content-Type": "application/json",
            "User-Agent": user_agent,
        }
        key = resolve_api_key(api_key)
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._head = render_headers(self._headers)  # the same lines on every request
        self._names = frozenset(name.lower() for name in self._headers)
        self._local = threading.local()
        self._all: list[Connection] = []
        self._waiting: set[Connection] = set()
        self._waits_ended = False
        self._lock = threading.Lock()

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        wait: float = 0.0,
        headers: dict[str, str] | None = None,
        resend: bool = True,
    ) -> Any:
        """One API call; ``wait`` is how long the service may hold it (long-poll).

        ``resend=False`` for a request that must not reach the service twice (a batch
        submit): a kept-alive connection the service has closed is replaced before the
        request goes out instead of being found dead after, when it would take a resend."""
        conn, reused = self._connection()
        if not resend and reused and _peer_closed(conn):
            conn.close()
            reused = False
        if wait <= 0:
            return self._call(conn, reused, method, path, body, 0.0, headers, resend)
        with self._lock:
            if self._waits_ended:
                raise ServerUnreachable(f"{method} {path}: not sent, the long-polls were ended")
            self._waiting.add(conn)
        try:
            return self._call(conn, reused, method, path, body, wait, headers, resend)
        finally:
            with self._lock:
                self._waiting.discard(conn)
                if self._waits_ended:
                    conn.close()  # half-closed: of no further use

    def end_waits(self) -> None:
        """End the long-polls in flight, and refuse new ones. Only our half of each
        connection is closed (SHUT_WR): the service ends the wait at once and answers
        before closing its half. Jobs granted in that instant arrive in the answer for the
        worker to hand back; a claim the service was making when it saw the request gone
        it releases itself (service/routers/leases.py). No grant goes unseen."""
        with self._lock:
            self._waits_ended = True
            for conn in self._waiting:
                if conn.sock is not None:
                    with contextlib.suppress(OSError):
                        conn.sock.shutdown(socket.SHUT_WR)

    def _call(
        self,
        conn: Connection,
        reused: bool,
        method: str,
        path: str,
        body: bytes | None,
        wait: float,
        headers: dict[str, str] | None,
        resend: bool,
    ) -> Any:
        conn.set_timeout(self._timeout + wait)
        sent = self._render(headers)
        try:
            answer = self._exchange(conn, method, path, body, sent)
        except ConnectFailed:
            raise
        except STALE_CONNECTION as exc:
            conn.close()
            # Not after an ended long-poll, nor for a request that must not arrive twice.
            if not (reused and resend) or (wait > 0 and self._waits_ended):
                raise self._unreachable(method, path, exc) from exc
            try:
                # A ConnectFailed now is a plain ServerUnreachable: the first send may
                # have arrived.
                answer = self._exchange(conn, method, path, body, sent)
            except (OSError, http.client.HTTPException) as again:
                conn.close()
                raise self._unreachable(method, path, again) from again
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise self._unreachable(method, path, exc) from exc
        return _decode(answer.status, answer.reason, answer.body, answer.retry_after)

    def _render(self, headers: dict[str, str] | None) -> bytes:
        """The request's header lines: the session's, then the call's own (which replace
        a session header of the same name)."""
        if not headers:
            return self._head
        if any(name.lower() in self._names for name in headers):
            given = {name.lower() for name in headers}
            kept = {k: v for k, v in self._headers.items() if k.lower() not in given}
            return render_headers({**kept, **headers})
        return self._head + render_headers(headers)

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()

    def _exchange(
        self, conn: Connection, method: str, path: str, body: bytes | None, headers: bytes
    ) -> Answer:
        if conn.sock is None:
            try:
                conn.connect()
            except OSError as exc:  # nothing was sent
                conn.close()
                raise ConnectFailed(self._describe(method, path, exc)) from exc
        return conn.exchange(method, self._prefix + path, body, headers)

    def _connection(self) -> tuple[Connection, bool]:
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, conn.sock is not None
        conn = Connection(self._host, self._port, https=self._https, timeout=self._timeout)
        self._local.conn = conn
        with self._lock:
            self._all.append(conn)
        return conn, False

    def _unreachable(self, method: str, path: str, exc: BaseException) -> ServerUnreachable:
        return ServerUnreachable(self._describe(method, path, exc))

    def _describe(self, method: str, path: str, exc: BaseException) -> str:
        return f"{method} {self.server}{path}: {type(exc).__name__}: {exc}"


def _peer_closed(conn: Connection) -> bool:
    """Whether the service has closed this idle kept-alive connection: it is readable
    (an end of file, or bytes no request asked for) when nothing is in flight."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        if hasattr(select, "poll"):  # no FD_SETSIZE limit, unlike select()
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _decode(status: int, reason: str, data: bytes, retry_after: str | None = None) -> Any:
    if 200 <= status < 300:
        return json.loads(data) if data else None
    try:
        problem = json.loads(data)
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        # Not from the service itself (a proxy, a crash page): keep a readable excerpt.
        problem = {"title": reason, "detail": data[:500].decode(errors="replace")}
    title = str(problem.get("title") or "Error")
    detail = str(problem.get("detail") or "")
    raise CeleriacError(status, title, detail, problem, retry_after=parse_retry_after(retry_after))
