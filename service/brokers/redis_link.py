"""The hot path's short Redis commands over one pipelined connection.

Each submit publishes its jobs to the index, each HTTP lease of the index pops it and then
acknowledges it, each settle announces it: one short command each, on every round trip.
Through redis-py's asyncio client one such command costs about 140 µs of the service's
CPU on this project's 2-core machine (a pool checkout, its retry wrapper, command
parsing, timeouts, observability hooks), about three times what sending it and reading
its reply costs. ``RedisLink`` does only that: it packs a command with hiredis, writes it,
and resolves the caller's future when hiredis parses its reply.

Its contract:

- Replies come back in the order commands were written, so one connection serves every
  caller at once: concurrent callers' commands are pipelined, never serialised by a lock.
- A command that fails in Redis raises ``redis.exceptions.ResponseError``; a connection
  that cannot be made or is lost fails every command in flight with
  ``redis.exceptions.ConnectionError``, and the next call connects again. Nothing is
  retried: a command in flight when the connection dropped may or may not have run, and
  each caller already treats a ``RedisError`` as "not known to have happened" (a lost
  publish is repaired by the reconciler, an unanswered pop by SQL's dispatch).
- A caller that is cancelled leaves its reply to be read and dropped: the order holds.
- A blocking command (``BZMPOP``, ``XREADGROUP … BLOCK``) goes through ``blocking``: a
  connection of its own for
  the wait (kept for the next one after, up to ``IDLE_BLOCKING_LINKS`` idle; closed if the
  wait is cancelled, which ends it in Redis too), never the shared one, where it would
  hold up every command behind it.

- ``listen`` delivers what is published on a channel, from a connection of its own, until
  that connection is lost (``ConnectionError``; the caller subscribes again) or the
  listener is cancelled (the connection closes). hiredis parses the messages as it parses
  replies: about 22 µs of the event loop's CPU per message heard, where redis-py's pub/sub
  client took 50 to 58. A handler that fails on one message is logged; the messages after
  it still arrive.

``for_url`` gives a link for what it speaks (``redis://`` and ``unix://`` with a host or
path, a database, a user and a password); anything else (TLS, connection options in the
URL) gets ``RedisPyCalls``, the same calls through redis-py's clients."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Any, Protocol, cast

import hiredis
import redis.asyncio as aioredis
from celeriac._resp import Endpoint, plain_endpoint
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 5.0
IDLE_BLOCKING_LINKS = 64  # kept open for the next long-poll; more are closed when done
# hiredis's stub types its argument as a one-element tuple: any command is a tuple of values.
_pack = cast(Callable[[tuple[Any, ...]], bytes], hiredis.pack_command)


class RedisCalls(Protocol):
    """Short, non-blocking commands; what the hot path needs of a Redis connection."""

    async def call(self, *args: Any) -> Any: ...

    async def many(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Commands sent together; their replies in order (the first error raised)."""
        ...

    async def blocking(self, *args: Any) -> Any:
        """A command that may block (``BZMPOP``), on a connection of its own."""
        ...

    async def script(self, sha: str, source: str, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA, sending the source once if Redis no longer holds it (a restart)."""
        ...

    async def listen(self, channel: str, deliver: Callable[[str], None]) -> None:
        """Each message published on ``channel``, to ``deliver``; returns only by raising
        (``RedisError`` when the subscription is lost)."""
        ...

    async def close(self) -> None: ...


def for_url(url: str, fallback: aioredis.Redis, blocking: aioredis.Redis) -> RedisCalls:
    """A ``RedisLink`` where the URL allows one, else the commands of redis-py's
    ``fallback`` (and ``blocking``, its client for blocking commands)."""
    endpoint = plain_endpoint(url)  # the URLs the worker's own connections speak too
    if endpoint is None:
        return RedisPyCalls(fallback, blocking)
    return RedisLink(endpoint)


class RedisPyCalls:
    """The same calls through redis-py's clients (their pools, retries and TLS)."""

    def __init__(self, client: aioredis.Redis, blocking: aioredis.Redis) -> None:
        self.client = client
        self.blocking_client = blocking

    async def call(self, *args: Any) -> Any:
        return await self.client.execute_command(*args)  # type: ignore[no-untyped-call]

    async def many(self, *commands: tuple[Any, ...]) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return list(await pipe.execute())

    async def blocking(self, *args: Any) -> Any:
        return await self.blocking_client.execute_command(*args)  # type: ignore[no-untyped-call]

    async def script(self, sha: str, source: str, keys: list[str], args: list[Any]) -> Any:
        return await _script(self, sha, source, keys, args)

    async def listen(self, channel: str, deliver: Callable[[str], None]) -> None:
        handle = _guarded(deliver, channel)
        async with self.client.pubsub() as pubsub:
            await pubsub.subscribe(channel)
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    handle(message["data"])
        raise RedisConnectionError("the subscription ended")

    async def close(self) -> None:
        pass  # the client is its owner's to close


def _guarded(deliver: Callable[[str], None], channel: str) -> Callable[[str], None]:
    """``deliver``, whose failure on one message is logged and does not end the
    subscription for the messages after it."""

    def handle(payload: str) -> None:
        try:
            deliver(payload)
        except Exception:
            log.exception("a message on %s was not handled", channel)

    return handle


async def _script(
    calls: RedisCalls, sha: str, source: str, keys: list[str], args: list[Any]
) -> Any:
    try:
        return await calls.call("EVALSHA", sha, len(keys), *keys, *args)
    except ResponseError as exc:
        if not str(exc).startswith("NOSCRIPT"):
            raise
    return await calls.call("EVAL", source, len(keys), *keys, *args)  # and cached again


class _Replies(asyncio.Protocol):
    """One connection: its futures, in the order their commands were written."""

    def __init__(self) -> None:
        # Decoded as the service's redis-py clients decode (decode_responses, "replace").
        self.reader = hiredis.Reader(
            protocolError=InvalidResponse,
            replyError=ResponseError,
            encoding="utf-8",
            errors="replace",
        )
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        # A subscribed connection's messages, which no command waits for.
        self.pushed: Callable[[Any], None] | None = None
        self.ended: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.ended = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while self.waiting or self.pushed is not None:
            try:
                reply = self.reader.gets()
            except InvalidResponse as exc:  # the stream cannot be trusted any more
                self._fail(RedisConnectionError(f"Redis sent what RESP is not: {exc}"))
                if self.transport is not None:
                    self.transport.close()
                return
            if reply is False:  # hiredis: the rest of this reply has not arrived
                return
            if not self.waiting:  # a message on a subscribed connection
                cast(Callable[[Any], None], self.pushed)(reply)
                continue
            future = self.waiting.popleft()
            if future.done():  # its caller was cancelled: the reply is dropped
                continue
            if isinstance(reply, ResponseError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}"))
        if self.ended is not None and not self.ended.done():
            self.ended.set_result(None)

    def _fail(self, error: Exception) -> None:
        self.lost = True
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)

    @property
    def usable(self) -> bool:
        """Neither lost nor closing (a close is seen before ``connection_lost`` runs)."""
        return not self.lost and self.transport is not None and not self.transport.is_closing()

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        return self.send_all([packed])[0]

    def send_all(self, packed: list[bytes]) -> list[asyncio.Future[Any]]:
        """Each command's future; the commands written in one system call."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in packed]
        if not self.usable or self.transport is None:
            for future in futures:
                future.set_exception(RedisConnectionError("connection to Redis lost"))
            return futures
        self.waiting.extend(futures)
        self.transport.write(packed[0] if len(packed) == 1 else b"".join(packed))
        return futures


class RedisLink:
    """One pipelined connection (see the module's docstring for its contract)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._replies: _Replies | None = None
        self._connecting: asyncio.Lock | None = None
        self._idle: list[RedisLink] = []  # for blocking commands, each alone on its own

    async def call(self, *args: Any) -> Any:
        return await (await self._ready()).send(_pack(args))

    async def many(self, *commands: tuple[Any, ...]) -> list[Any]:
        replies = await self._ready()
        # Every reply awaited, so none is left with an unread exception; a cancel of the
        # caller cancels them all (their replies are then read and dropped).
        results = await asyncio.gather(
            *replies.send_all([_pack(command) for command in commands]), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    async def script(self, sha: str, source: str, keys: list[str], args: list[Any]) -> Any:
        return await _script(self, sha, source, keys, args)

    async def blocking(self, *args: Any) -> Any:
        link = self._idle.pop() if self._idle else RedisLink(self.endpoint)
        try:
            reply = await link.call(*args)
        except BaseException:  # cancelled mid-wait, or an error: not worth sorting out
            await link.close()
            raise
        if len(self._idle) < IDLE_BLOCKING_LINKS:
            self._idle.append(link)
        else:
            await link.close()
        return reply

    async def listen(self, channel: str, deliver: Callable[[str], None]) -> None:
        link = RedisLink(self.endpoint)  # a subscribed connection serves nothing else
        handle = _guarded(deliver, channel)

        def message(reply: Any) -> None:
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == "message":
                handle(reply[2])

        try:
            replies = await link._ready()
            replies.pushed = message
            await replies.send(_pack(("SUBSCRIBE", channel)))
            await cast(asyncio.Future[None], replies.ended)
        finally:
            await link.close()
        raise RedisConnectionError("connection to Redis lost")

    async def close(self) -> None:
        replies, self._replies = self._replies, None
        if replies is not None and replies.transport is not None:
            replies.transport.close()
        idle, self._idle = self._idle, []
        for link in idle:
            await link.close()

    async def _ready(self) -> _Replies:
        replies = self._replies
        if replies is not None and replies.usable:
            return replies
        return await self._connect()

    async def _connect(self) -> _Replies:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:  # one connection attempt for every caller waiting
            if self._replies is not None and self._replies.usable:
                return self._replies
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                    replies = await self._open()
                    await self._hello(replies)
            except (OSError, TimeoutError) as exc:
                raise RedisConnectionError(f"cannot connect to Redis: {exc}") from exc
            self._replies = replies
            return replies

    async def _open(self) -> _Replies:
        loop = asyncio.get_running_loop()
        endpoint = self.endpoint
        if endpoint.path is not None:
            _, replies = await loop.create_unix_connection(_Replies, endpoint.path)
        else:
            _, replies = await loop.create_connection(_Replies, endpoint.host, endpoint.port)
        return replies

    async def _hello(self, replies: _Replies) -> None:
        """AUTH and SELECT, as redis-py would (a failure closes the connection)."""
        try:
            for command in self.endpoint.hello():
                await replies.send(_pack(command))
        except BaseException:
            if replies.transport is not None:
                replies.transport.close()
            raise
