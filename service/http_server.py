"""The HTTP/1.1 protocol ``celeriac serve`` runs: uvicorn's httptools protocol with a cap
on the request head. llhttp (under httptools) buffers a request line and headers of any
size, so without this a client could send a 10 MB header (before any key is checked) and
the service would hold all of it; h11 has a cap but parses more slowly."""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Far above any real request head (browsers cap at 8-16 KiB per header line); the error
# is a 431 and the connection closes.
MAX_HEAD_BYTES = 64 * 1024


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """Counts the bytes of each request's head as they arrive; one that passes
    ``MAX_HEAD_BYTES`` before its headers are complete gets 431 and the connection ends.
    The bytes of a chunk that also carries the body count too, so the cap is checked
    only while the head is still incomplete after the chunk was parsed."""

    _head_bytes = 0
    _head_done = False

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
