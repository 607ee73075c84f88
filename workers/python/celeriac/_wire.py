"""One kept-alive HTTP/1.1 connection, written and read by hand.

``http.client`` cost most of a small call's client CPU: it sends a request's head and its
body in two writes (two packets with TCP_NODELAY, which the service then parses as two
reads), and it parses every answer's head with the email package. Here a request goes out
in one write, and the answer's head is read line by line, keeping the few headers the SDK
uses. Failures raise ``http.client``'s own exceptions (``RemoteDisconnected`` for a
kept-alive connection the service had closed, ``IncompleteRead``, ``LineTooLong``…), and
socket errors as they come, so callers tell them apart as before.
"""

from __future__ import annotations

import re
import socket
import ssl
from dataclasses import dataclass
from http.client import (
    BadStatusLine,
    HTTPException,
    IncompleteRead,
    LineTooLong,
    RemoteDisconnected,
)
from typing import BinaryIO

# http.client's own limits for a line of the head and for the number of headers.
MAX_LINE = 65536
MAX_HEADERS = 100
# What http.client refuses in a request target and in a header value: a client that
# passes them on would let a caller's text add headers or requests of its own.
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_BAD_VALUE = re.compile(r"[\x00\r\n]")
_KEPT = frozenset({"content-length", "transfer-encoding", "connection", "retry-after"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_END_OF_HEAD = (b"\r\n", b"\n", b"")


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    reason: str
    body: bytes
    retry_after: str | None


def render_headers(headers: dict[str, str]) -> bytes:
    """Header lines (each ending in CRLF) for a request head, checked as http.client does."""
    lines = []
    for name, value in headers.items():
        if not name.isascii() or _BAD_TARGET.search(name) or ":" in name:
            raise ValueError(f"Invalid header name {name!r}")
        if _BAD_VALUE.search(value):
            raise ValueError(f"Invalid header value {value!r}")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("latin-1")


_tls: ssl.SSLContext | None = None


def _tls_context() -> ssl.SSLContext:
    global _tls
    if _tls is None:  # loading the CA store takes milliseconds: once per process
        _tls = ssl.create_default_context()
    return _tls


def _host_value(host: str, port: int, https: bool) -> bytes:
    try:
        name = host.encode("ascii")
    except UnicodeEncodeError:
        name = host.encode("idna")
    if b":" in name:  # an IPv6 address
        name = b"[" + name + b"]"
    return name if port == (443 if https else 80) else b"%s:%d" % (name, port)


class Connection:
    """``connect``, ``exchange`` (one request, its whole answer), ``close``. One request
    at a time; ``sock`` is None while closed."""

    def __init__(self, host: str, port: int | None, *, https: bool, timeout: float) -> None:
        self.host = host
        self.port = port or (443 if https else 80)
        self.https = https
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._reader: BinaryIO | None = None
        self._host_line = b"Host: " + _host_value(host, self.port, https) + b"\r\n"

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        try:
            # The head and body go out in one write, but a report right after a lease
            # must not wait for a delayed ACK either.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.https:
                sock = _tls_context().wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._reader = sock.makefile("rb")

    def close(self) -> None:
        sock, reader = self.sock, self._reader
        self.sock = self._reader = None
        if reader is not None:
            reader.close()
        if sock is not None:
            sock.close()

    def set_timeout(self, seconds: float) -> None:
        if seconds == self.timeout:  # settimeout costs two fcntl calls even when unchanged
            return
        self.timeout = seconds
        if self.sock is not None:
            self.sock.settimeout(seconds)

    def exchange(self, method: str, target: str, body: bytes | None, headers: bytes) -> Answer:
        """Send one request (``headers``: from ``render_headers``) and read its answer;
        the connection is closed afterwards when the service said it would close it."""
        if not method.isascii() or not method.isalpha():
            raise ValueError(f"Invalid method {method!r}")
        if _BAD_TARGET.search(target):
            raise ValueError(f"URL can't contain control characters: {target!r}")
        if self.sock is None or self._reader is None:
            raise ConnectionError("not connected")
        head = f"{method} {target} HTTP/1.1\r\n".encode("ascii") + self._host_line + headers
        if body is not None:
            head += b"Content-Length: %d\r\n" % len(body)
        elif method in _BODY_METHODS:
            head += b"Content-Length: 0\r\n"
        self.sock.sendall(head + b"Accept-Encoding: identity\r\n\r\n" + (body or b""))
        answer, will_close = _read_answer(self._reader, method)
        if will_close:
            self.close()
        return answer


def _read_answer(reader: BinaryIO, method: str) -> tuple[Answer, bool]:
    while True:
        version, status, reason = _status_line(reader)
        kept = _head(reader)
        if status != 100:  # a 100 Continue is followed by the real answer
            break
    connection = kept.get("connection", "").lower()
    # HTTP/1.1 keeps the connection unless told otherwise; HTTP/1.0 closes it.
    persistent = "keep-alive" in connection if version == "HTTP/1.0" else "close" not in connection
    will_close = not persistent
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        body = b""
    elif "chunked" in kept.get("transfer-encoding", "").lower():
        body = _chunked(reader)
    elif (length := _length(kept.get("content-length"))) is not None:
        body = reader.read(length)
        if len(body) < length:
            raise IncompleteRead(body, length - len(body))
    else:  # no length: the answer ends with the connection
        body, will_close = reader.read(), True
    return Answer(status, reason, body, kept.get("retry-after")), will_close


def _status_line(reader: BinaryIO) -> tuple[str, int, str]:
    line = reader.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise LineTooLong("status line")
    if not line:
        raise RemoteDisconnected("Remote end closed connection without response")
    parts = line.decode("iso-8859-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise BadStatusLine(repr(line))
    try:
        status = int(parts[1])
    except ValueError:
        raise BadStatusLine(repr(line)) from None
    if not 100 <= status <= 999:
        raise BadStatusLine(repr(line))
    return parts[0], status, parts[2].strip() if len(parts) > 2 else ""


def _head(reader: BinaryIO) -> dict[str, str]:
    """The headers the SDK reads (the first of each), from the rest of the head."""
    kept: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = reader.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise LineTooLong("header line")
        if line in _END_OF_HEAD:
            return kept
        name, _, value = line.decode("iso-8859-1").partition(":")
        name = name.strip().lower()
        if name in _KEPT and name not in kept:
            kept[name] = value.strip()
    raise HTTPException(f"got more than {MAX_HEADERS} headers")


def _length(text: str | None) -> int | None:
    if text is None or not text.isdigit():
        return None  # absent or not a number: read to the end, as http.client does
    return int(text)


def _chunked(reader: BinaryIO) -> bytes:
    parts: list[bytes] = []
    while True:
        line = reader.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise LineTooLong("chunk size")
        try:
            size = int(line.split(b";", 1)[0], 16)
        except ValueError:
            raise IncompleteRead(b"".join(parts)) from None
        if size == 0:
            break
        chunk = reader.read(size)
        if len(chunk) < size:
            raise IncompleteRead(b"".join(parts) + chunk, size - len(chunk))
        parts.append(chunk)
        reader.read(2)  # the chunk's CRLF
    for _ in range(MAX_HEADERS + 1):  # trailers: read, not kept
        line = reader.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise LineTooLong("trailer line")
        if line in _END_OF_HEAD:
            break
    return b"".join(parts)
