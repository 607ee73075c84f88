"""The Redis connections of a worker on the Redis protocol (``celeriac worker --broker``).

Importing redis-py takes about 100 ms, because redis-py 8 imports its asyncio and cluster
clients with the package. That is a third of a Redis worker's start before its first
result (docs/benchmarks.md, issue 14, twelfth pass). The worker needs little: a few
commands pipelined on one connection, and one blocking pop. For the URLs it can speak
(``redis://`` and ``unix://``, with a host or a path, a database, a user and a
password, and no other option), ``connect`` therefore gives a ``PlainRedis``. It packs
commands and parses replies with hiredis on a plain socket. Any other URL (TLS,
connection options), or a machine without hiredis, gets ``RedisPyRedis``, and redis-py
is imported only then.

The contract, the same either way:

- ``pipeline(calls)`` sends every call in one write and returns the replies in order.
  A call that failed in Redis is a ``ReplyError`` in its place.
- ``blocking(*command)`` runs one blocking command (``BLPOP``) on a connection of its
  own, with a longer socket timeout, so it never holds up the pipelined calls. An
  error reply raises ``ReplyError``.
- A connection that cannot be made, times out or breaks raises ``RedisUnavailable``.
  It is not used again, and the next call connects anew. Nothing is retried here: a
  call in flight when the connection broke may or may not have run. An idle connection
  that Redis closed meanwhile (a restart) is replaced before a call goes out on it.
- Calls may come from several threads at once; each takes a connection of its own from
  a small pool."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

CONNECT_TIMEOUT_SECONDS = 10.0
_READ_SIZE = 65536


class RedisFailure(Exception):
    """Anything that went wrong talking to Redis."""


class RedisUnavailable(RedisFailure):
    """Redis could not be reached, did not answer in time, or the connection broke."""


class ReplyError(RedisFailure):
    """An error reply (``-ERR …``, ``-STALE …``): that command's failure alone."""


class RedisClient(Protocol):
    def pipeline(self, calls: Sequence[tuple[Any, ...]]) -> list[Any]: ...

    def blocking(self, *command: Any) -> Any: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a plain connection goes, and what it says first."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None  # a Unix socket
    db: int = 0
    username: str | None = None
    password: str | None = None

    def hello(self) -> list[tuple[Any, ...]]:
        """What a connection says first, as redis-py would: AUTH, then SELECT."""
        hello: list[tuple[Any, ...]] = []
        if self.password is not None:
            user = [self.username] if self.username else []
            hello.append(("AUTH", *user, self.password))
        if self.db:
            hello.append(("SELECT", self.db))
        return hello


def plain_endpoint(url: str) -> Endpoint | None:
    """The endpoint of a URL ``PlainRedis`` speaks, read as redis-py reads it (a ``db``
    query option before the path's); None for any other URL. The service's ``RedisLink``
    (service/brokers/redis_link.py) speaks the same URLs."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "unix") or parts.fragment:
        return None
    try:
        options = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        port = parts.port
    except ValueError:
        return None  # redis-py says what is wrong with it
    if set(options) - {"db"} or len(options.get("db", ())) > 1:
        return None
    try:
        if "db" in options:
            db = int(options["db"][0])
        elif parts.scheme == "redis" and parts.path not in ("", "/"):
            db = int(parts.path.lstrip("/"))
        else:
            db = 0
    except ValueError:
        return None
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None  # as redis-py reads it
    if parts.scheme == "unix":
        if not parts.path:
            return None
        return Endpoint(path=unquote(parts.path), db=db, username=username, password=password)
    host = unquote(parts.hostname) if parts.hostname else "localhost"
    return Endpoint(host, port or 6379, None, db, username, password)


def connect(url: str, *, socket_timeout: float, blocking_timeout: float) -> RedisClient:
    """A client for ``url``: plain where it can be (see the module's docstring).
    ``ModuleNotFoundError`` (name ``redis``) when the URL needs redis-py and it is
    not installed."""
    endpoint = plain_endpoint(url)
    pack = _hiredis_pack()
    if endpoint is not None and pack is not None:
        return PlainRedis(endpoint, pack, socket_timeout, blocking_timeout)
    return RedisPyRedis(url, socket_timeout, blocking_timeout)


Pack = Callable[[tuple[Any, ...]], bytes]


def _hiredis_pack() -> Pack | None:
    try:
        from hiredis import pack_command
    except ImportError:
        return None
    pack: Pack = pack_command
    return pack


class _Connection:
    """One socket, and hiredis's reader of what comes back on it."""

    def __init__(self, endpoint: Endpoint, pack: Pack, timeout: float) -> None:
        import hiredis

        self._sock = _open(endpoint)
        self._reader = hiredis.Reader(replyError=ReplyError)
        self._sock.settimeout(timeout)
        hello = endpoint.hello()
        if not hello:
            return
        try:  # AUTH and SELECT, as redis-py would; a refusal closes the connection
            replies = self.exchange(b"".join([pack(call) for call in hello]), len(hello))
        except BaseException:
            self.close()
            raise
        refused = [reply for reply in replies if isinstance(reply, ReplyError)]
        if refused:
            self.close()
            raise RedisUnavailable(f"Redis refused the connection: {refused[0]}")

    def exchange(self, packed: bytes, count: int) -> list[Any]:
        """Send ``packed`` (``count`` commands) and read their ``count`` replies."""
        self._sock.sendall(packed)
        replies: list[Any] = []
        reader = self._reader
        while len(replies) < count:
            reply = reader.gets()
            if reply is False:  # no whole reply yet (RESP2 has no false)
                data = self._sock.recv(_READ_SIZE)
                if not data:
                    raise RedisUnavailable("Redis closed the connection")
                reader.feed(data)
            else:
                replies.append(reply)
        return replies

    def closed_by_redis(self) -> bool:
        """Whether this idle connection has something to read: Redis closed it (a
        restart, ``CLIENT KILL``, its idle timeout) or sent what nobody asked for."""
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        return bool(poller.poll(0))

    def close(self) -> None:
        self._sock.close()


def _open(endpoint: Endpoint) -> socket.socket:
    try:
        if endpoint.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(CONNECT_TIMEOUT_SECONDS)
                sock.connect(endpoint.path)
            except BaseException:
                sock.close()
                raise
            return sock
        address = (endpoint.host, endpoint.port)
        sock = socket.create_connection(address, timeout=CONNECT_TIMEOUT_SECONDS)
    except OSError as exc:
        raise RedisUnavailable(f"cannot connect to Redis: {exc}") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _Pool:
    """Idle connections to one endpoint, for callers on any thread."""

    def __init__(self, endpoint: Endpoint, pack: Pack, timeout: float) -> None:
        self._endpoint, self._pack, self._timeout = endpoint, pack, timeout
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def run(self, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
        conn = self._take()
        try:
            if conn is None:
                conn = _Connection(self._endpoint, self._pack, self._timeout)
            replies = conn.exchange(b"".join([self._pack(call) for call in calls]), len(calls))
        except BaseException as exc:
            if conn is not None:  # replies may be left unread: it is of no further use
                conn.close()
            failure = _unavailable(exc)
            if failure is exc:
                raise
            raise failure from exc
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return replies
        conn.close()
        return replies

    def _take(self) -> _Connection | None:
        """An idle connection Redis has not closed meanwhile (as redis-py's pool checks at
        checkout), or None."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None or not conn.closed_by_redis():
                return conn
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _unavailable(exc: BaseException) -> BaseException:
    """A socket's or hiredis's failure as ``RedisUnavailable``; anything else as is."""
    if isinstance(exc, RedisFailure):
        return exc
    if isinstance(exc, OSError):  # a timeout, a reset, a refused connection
        return RedisUnavailable(f"{type(exc).__name__}: {exc}")
    if type(exc).__name__ == "ProtocolError":  # hiredis's: the stream is garbled
        return RedisUnavailable(f"Redis sent what is not RESP: {exc}")
    return exc


class PlainRedis:
    """``RedisClient`` on plain sockets, hiredis packing and parsing."""

    def __init__(
        self, endpoint: Endpoint, pack: Pack, socket_timeout: float, blocking_timeout: float
    ) -> None:
        self._calls = _Pool(endpoint, pack, socket_timeout)
        self._blocking = _Pool(endpoint, pack, blocking_timeout)

    def pipeline(self, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
        return self._calls.run(calls)

    def blocking(self, *command: Any) -> Any:
        [reply] = self._blocking.run([command])
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    def close(self) -> None:
        self._calls.close()
        self._blocking.close()


class RedisPyRedis:
    """``RedisClient`` through redis-py, for the URLs ``PlainRedis`` does not speak."""

    def __init__(self, url: str, socket_timeout: float, blocking_timeout: float) -> None:
        import redis

        options: dict[str, Any] = {
            "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "health_check_interval": 0,
        }
        # Typed Any: redis-py leaves execute_command (all we use) unannotated.
        self._redis: Any = redis.Redis.from_url(url, socket_timeout=socket_timeout, **options)
        self._blocking: Any = redis.Redis.from_url(url, socket_timeout=blocking_timeout, **options)

    def pipeline(self, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
        """On a pooled connection, without redis-py's pipeline object: at thousands of
        jobs a second its per-command bookkeeping was most of the cost."""
        from redis.exceptions import RedisError, ResponseError

        pool = self._redis.connection_pool
        try:
            conn = pool.get_connection()
        except RedisError as exc:
            raise _failure(exc) from exc
        try:
            conn.send_packed_command(conn.pack_commands(calls))
            replies: list[Any] = []
            for _ in calls:
                try:
                    replies.append(conn.read_response())
                except ResponseError as exc:
                    replies.append(ReplyError(str(exc)))
        except RedisError as exc:
            conn.disconnect()
            raise _failure(exc) from exc
        except BaseException:
            conn.disconnect()  # replies may be left unread: the connection is unusable
            raise
        finally:
            pool.release(conn)
        return replies

    def blocking(self, *command: Any) -> Any:
        from redis.exceptions import RedisError

        try:
            return self._blocking.execute_command(*command)
        except RedisError as exc:
            raise _failure(exc) from exc

    def close(self) -> None:
        self._redis.close()
        self._blocking.close()


def _failure(exc: Exception) -> RedisFailure:
    from redis.exceptions import ConnectionError, ResponseError, TimeoutError

    if isinstance(exc, ConnectionError | TimeoutError):
        return RedisUnavailable(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, ResponseError):
        return ReplyError(str(exc))
    return RedisFailure(f"{type(exc).__name__}: {exc}")
