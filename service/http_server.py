"""The HTTP/1.1 protocol ``celeriac serve`` runs: uvicorn's httptools protocol with a cap
on the request head, whose writes leave one send per turn of the event loop.

- The cap: llhttp (under httptools) buffers a request line and headers of any size, so
  without it a client could send a 10 MB header (before any key is checked) and the
  service would hold all of it; h11 has a cap but parses more slowly.
- One send per turn: uvicorn writes a response's head and its body with two
  ``transport.write`` calls, and the event loop sends each at once: two ``send`` system
  calls per response, and on loopback two wake-ups of the client, which finds half a
  response the first time (docs/benchmarks.md, issue 14, eleventh pass).
- A peer's half-close: a client that closes its half of the connection (a worker ending
  its long-polls sends FIN with ``shutdown(SHUT_WR)``) while a request of its is being
  answered still gets the answer, and the connection closes after it. Uvicorn closes at
  once, so an answer under way was lost: a lease granted in that moment went to nobody
  until its deadline, and the job ran again. The handler learns of the departure through
  ``peer_has_closed`` (a long-poll ends at once), and whatever it still sends arrives."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Far above any real request head (browsers cap at 8-16 KiB per header line); the error
# is a 431 and the connection closes.
MAX_HEAD_BYTES = 64 * 1024


class OneSendPerTurn(asyncio.Transport):
    """A transport that holds a write until the next one or the end of the event loop's
    turn: a response's head waits for its body and the two go in one send, and a lone
    write (a streamed chunk) goes when the turn ends. Ordering is kept (every write goes
    through the same buffer); ``close`` sends what is held first, ``abort`` drops it. The
    rest is the wrapped transport's own."""

    __slots__ = ("_inner", "_loop", "_pending")

    def __init__(self, inner: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._inner = inner
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._pending.append(bytes(data))
        if len(self._pending) == 1:  # held until the next write or the turn's end
            self._loop.call_soon(self._send)
        else:  # a response's head and its body: both now, in one send
            self._send()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _send(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._inner.is_closing():
            self._inner.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._send()
        self._inner.close()

    def abort(self) -> None:
        self._pending = []
        self._inner.abort()

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()

    def is_reading(self) -> bool:
        return self._inner.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._inner.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self._inner.get_write_buffer_size() + sum(map(len, self._pending))

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._inner.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._inner.set_write_buffer_limits(high, low)

    def can_write_eof(self) -> bool:
        return self._inner.can_write_eof()

    def write_eof(self) -> None:
        self._send()
        self._inner.write_eof()


# The scope key under which each request of a connection finds its ``PeerHalf``.
PEER_SCOPE_KEY = "celeriac.peer"


class PeerHalf:
    """The client's half of one connection: ``closed`` once it has sent FIN."""

    __slots__ = ("closed",)

    def __init__(self) -> None:
        self.closed = False


def peer_has_closed(scope: Mapping[str, Any]) -> bool:
    """Whether the request's client has closed its half of the connection. Always False
    under another server (or in process), where a departure is ``http.disconnect``."""
    peer = scope.get(PEER_SCOPE_KEY)
    return peer is not None and bool(peer.closed)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """Counts the bytes of each request's head as they arrive; one that passes
    ``MAX_HEAD_BYTES`` before its headers are complete gets 431 and the connection ends.
    The bytes of a chunk that also carries the body count too, so the cap is checked
    only while the head is still incomplete after the chunk was parsed."""

    _head_bytes = 0
    _head_done = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._peer = PeerHalf()
        super().connection_made(OneSendPerTurn(transport, self.loop))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[PEER_SCOPE_KEY] = self._peer  # type: ignore[literal-required]

    def eof_received(self) -> bool:  # type: ignore[override]
        """The client closed its half. With a whole request still being answered, our
        half stays open for the answer and closes after it; otherwise (idle, or a request
        cut short) the connection closes now, as uvicorn's does."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete or cycle.more_body:
            return False
        self._peer.closed = True
        cycle.keep_alive = False  # the connection closes once the answer is sent
        cycle.message_event.set()  # wakes a handler waiting in receive() for a departure
        return True

    def data_received(self, data: bytes) -> None:
        if not self._head_done:
            self._head_bytes += len(data)
        super().data_received(data)
        if not self._head_done and self._head_bytes > MAX_HEAD_BYTES:
            self._refuse_head()

    def on_headers_complete(self) -> None:
        self._head_done = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_done, self._head_bytes = False, 0

    def _refuse_head(self) -> None:
        if self.transport.is_closing():
            return
        body = b"the request head exceeds 65536 bytes"
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: text/plain; charset=utf-8\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self.transport.close()
