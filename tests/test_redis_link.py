"""The hot path's pipelined Redis connection (service/brokers/redis_link.py), against the
real Redis: replies reach their own callers however many are in flight, an error is that
command's alone, a script Redis does not hold is sent once, a lost connection fails what
was in flight and the next call connects again, a cancelled caller leaves the order
intact, and a URL the link does not speak goes through redis-py."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis
import uvloop
from conftest import REDIS_HOST, REDIS_PORT, require_available
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from service.brokers import redis_link
from service.brokers.redis_link import RedisLink, RedisPyCalls

DB = 10
URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{DB}"


Body = Callable[[RedisLink, str], Awaitable[None]]


@pytest.fixture(params=["asyncio", "uvloop"])
def with_link(request: pytest.FixtureRequest) -> Callable[[Body], None]:
    """Runs a test's body with a link and a key prefix of its own, on the event loop the
    service runs (uvloop) and on asyncio's own."""
    require_available("redis")

    def run(body: Body) -> None:
        async def main() -> None:
            fallback = aioredis.from_url(URL)
            calls = redis_link.for_url(URL, fallback, fallback)
            assert isinstance(calls, RedisLink)
            try:
                await body(calls, f"{{linktest-{uuid.uuid4().hex[:8]}}}")
            finally:
                await calls.close()
                await fallback.aclose()

        (uvloop.run if request.param == "uvloop" else asyncio.run)(main())

    return run


def test_concurrent_callers_each_get_their_own_reply(with_link: Callable[[Body], None]) -> None:
    async def body(link: RedisLink, key: str) -> None:
        replies = await asyncio.gather(*(link.call("ECHO", f"reply-{i}") for i in range(500)))
        assert replies == [f"reply-{i}" for i in range(500)]
        # All on one connection, in the order written: INCR's replies count up.
        counts = await asyncio.gather(*(link.call("INCR", f"{key}:n") for _ in range(200)))
        assert counts == list(range(1, 201))
        assert await link.call("CLIENT", "INFO") and await link.call("DEL", f"{key}:n") == 1

    with_link(body)


def test_the_database_of_the_url_is_selected(with_link: Callable[[Body], None]) -> None:
    async def body(link: RedisLink, key: str) -> None:
        await link.call("SET", f"{key}:db", "here")
        other = aioredis.from_url(f"redis://{REDIS_HOST}:{REDIS_PORT}/{DB}", decode_responses=True)
        try:
            assert await other.get(f"{key}:db") == "here"
        finally:
            await other.delete(f"{key}:db")
            await other.aclose()

    with_link(body)


def test_an_error_is_that_commands_alone(with_link: Callable[[Body], None]) -> None:
    async def body(link: RedisLink, key: str) -> None:
        await link.call("SET", f"{key}:s", "text")
        results = asyncio.gather(
            link.call("ECHO", "before"),
            link.call("INCR", f"{key}:s"),  # not an integer
            link.call("ECHO", "after"),
            return_exceptions=True,
        )
        before, error, after = await results
        assert (before, after) == ("before", "after")
        assert isinstance(error, ResponseError) and "not an integer" in str(error)
        with pytest.raises(ResponseError):
            await link.many(("ECHO", "a"), ("INCR", f"{key}:s"), ("ECHO", "b"))
        assert await link.many(("ECHO", "a"), ("DEL", f"{key}:s")) == ["a", 1]

    with_link(body)


def test_a_script_redis_does_not_hold_is_sent_once(with_link: Callable[[Body], None]) -> None:
    async def body(link: RedisLink, key: str) -> None:
        # A source of its own: no other test's service can have loaded it.
        source = f"-- {key}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])"
        sha = hashlib.sha1(source.encode()).hexdigest()
        assert await link.call("SCRIPT", "EXISTS", sha) == [0]
        assert await link.script(sha, source, [f"{key}:c"], [2]) == 2
        assert await link.call("SCRIPT", "EXISTS", sha) == [1]  # EVAL cached it
        assert await link.script(sha, source, [f"{key}:c"], [3]) == 5
        with pytest.raises(ResponseError):  # any other error is the caller's
            await link.script(sha, "return redis.call('NOPE')", [], [])
        await link.call("DEL", f"{key}:c")

    with_link(body)


def test_a_lost_connection_fails_what_was_in_flight_then_reconnects(
    with_link: Callable[[Body], None],
) -> None:
    async def body(link: RedisLink, key: str) -> None:
        client_id = await link.call("CLIENT", "ID")
        blocked = asyncio.ensure_future(link.call("BLPOP", f"{key}:never", 10))
        await asyncio.sleep(0.05)
        killer = aioredis.from_url(URL)
        try:
            assert await killer.execute_command("CLIENT", "KILL", "ID", client_id) == 1
        finally:
            await killer.aclose()
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(blocked, 5)
        assert await link.call("ECHO", "again") == "again"
        assert await link.call("CLIENT", "ID") != client_id

    with_link(body)


def test_a_cancelled_caller_leaves_the_order_intact(with_link: Callable[[Body], None]) -> None:
    async def body(link: RedisLink, key: str) -> None:
        slow = asyncio.ensure_future(link.call("BLPOP", f"{key}:list", 2))
        behind = asyncio.ensure_future(link.call("ECHO", "behind"))
        await asyncio.sleep(0.05)
        slow.cancel()
        pusher = aioredis.from_url(URL)
        try:
            await pusher.rpush(f"{key}:list", "x")
        finally:
            await pusher.aclose()
        assert await asyncio.wait_for(behind, 5) == "behind"  # not the cancelled BLPOP's reply
        assert await link.call("ECHO", "next") == "next"

    with_link(body)


def test_a_blocking_command_waits_alone(with_link: Callable[[Body], None]) -> None:
    async def body(link: RedisLink, key: str) -> None:
        ready = f"{key}:ready"
        waiting = asyncio.ensure_future(link.blocking("BZMPOP", 5, 1, ready, "MIN", "COUNT", 2))
        await asyncio.sleep(0.05)
        # The shared connection is not held up by the wait.
        assert await asyncio.wait_for(link.call("ZADD", ready, 2, "b", 1, "a"), 1) == 2
        assert await asyncio.wait_for(waiting, 5) == [ready, [["a", "1"], ["b", "2"]]]
        # A cancelled wait closes its connection, and so ends in Redis: nothing is popped.
        cancelled = asyncio.ensure_future(link.blocking("BLPOP", f"{key}:list", 5))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        await asyncio.sleep(0.05)
        await link.call("RPUSH", f"{key}:list", "kept")
        assert await link.blocking("BLPOP", f"{key}:list", 1) == [f"{key}:list", "kept"]
        assert await link.blocking("BZMPOP", 0.01, 1, ready, "MIN") is None

    with_link(body)


def test_a_refused_connection_is_a_connection_error() -> None:
    async def main() -> None:
        calls = redis_link.for_url(
            "redis://127.0.0.1:1/0", aioredis.from_url(URL), aioredis.from_url(URL)
        )
        with pytest.raises(RedisConnectionError):
            await calls.call("PING")

    uvloop.run(main())


@pytest.mark.parametrize(
    "url", ["rediss://127.0.0.1:6380/0", f"{URL}?socket_timeout=3", f"{URL}?ssl_cert_reqs=none"]
)
def test_what_the_link_does_not_speak_goes_through_redis_py(url: str) -> None:
    require_available("redis")

    async def main() -> None:
        fallback = aioredis.from_url(URL, decode_responses=True)
        try:
            calls = redis_link.for_url(url, fallback, fallback)
            assert isinstance(calls, RedisPyCalls)
            assert await calls.call("ECHO", "via redis-py") == "via redis-py"
            assert await calls.many(("ECHO", "a"), ("ECHO", "b")) == ["a", "b"]
            assert await calls.blocking("BLPOP", "{linktest}:none", 0.01) is None
        finally:
            await fallback.aclose()

    uvloop.run(main())


def test_stream_entries_read_the_same_through_the_link_and_redis_py() -> None:
    """The event ingest's reads (``XREADGROUP``) go through either; the fields come out
    as one dict whatever the shape each hands back."""
    require_available("redis")
    from service.brokers.redis_protocol import _fields

    async def main() -> None:
        stream = f"{{linktest-{uuid.uuid4().hex[:8]}}}:events"
        client = aioredis.from_url(URL, decode_responses=True)
        link = redis_link.for_url(URL, client, client)
        fallback = RedisPyCalls(client, client)
        try:
            await client.xgroup_create(stream, "g", id="0", mkstream=True)
            await client.xadd(stream, {"k": "C", "id": "j1", "r": "1"})
            await client.xadd(stream, {"k": "F", "id": "j2"})
            read = []
            for calls in (link, fallback):
                await client.xgroup_setid(stream, "g", "0")
                answer = await calls.blocking(
                    "XREADGROUP", "GROUP", "g", "c", "COUNT", 10, "BLOCK", 100,
                    "STREAMS", stream, ">",
                )  # fmt: skip
                read.append([_fields(raw) for _id, raw in answer[0][1]])
            assert read[0] == read[1] == [{"k": "C", "id": "j1", "r": "1"}, {"k": "F", "id": "j2"}]
        finally:
            await client.delete(stream)
            await link.close()
            await client.aclose()

    uvloop.run(main())


async def _subscribers(client: aioredis.Redis, channel: str, count: int) -> None:
    """Until ``channel`` has ``count`` subscribers (bounded by the caller's timeout)."""
    while (await client.pubsub_numsub(channel))[0][1] != count:  # noqa: ASYNC110 - Redis's view
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("through", ["link", "redis-py"])
def test_listen_delivers_each_message_until_its_connection_is_lost(through: str) -> None:
    """The replicas' announcements arrive through ``listen``: every message, in order, to
    the listener alone (a command on the shared connection still answers); a killed
    connection ends it with a connection error (the broker then subscribes again); a
    cancelled listener leaves no subscriber behind."""
    require_available("redis")

    async def main() -> None:
        channel = f"{{linktest-{uuid.uuid4().hex[:8]}}}:announce"
        client = aioredis.from_url(URL, decode_responses=True)
        link = redis_link.for_url(URL, client, client)
        calls = link if through == "link" else RedisPyCalls(client, client)
        heard: list[str] = []
        everything = asyncio.Event()

        def deliver(payload: str) -> None:
            heard.append(payload)
            if payload == "f:last":
                everything.set()
            if payload == "f:bad":
                raise ValueError("a handler's own failure")

        try:
            listening = asyncio.ensure_future(calls.listen(channel, deliver))
            await asyncio.wait_for(_subscribers(client, channel, 1), 5)
            sent = ["r:q1", "f:bad", "f:a,b", "d:", "f:ünï", "f:last"]
            for payload in sent:
                await client.publish(channel, payload)
            assert await calls.call("ECHO", "still") == "still"
            await asyncio.wait_for(everything.wait(), 5)
            assert heard == sent  # a handler that raised did not end the subscription
            await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            with pytest.raises(RedisConnectionError):
                await asyncio.wait_for(listening, 5)

            again = asyncio.ensure_future(calls.listen(channel, deliver))
            await asyncio.wait_for(_subscribers(client, channel, 1), 5)
            again.cancel()
            await asyncio.wait_for(_subscribers(client, channel, 0), 5)
        finally:
            await link.close()
            await client.aclose()

    uvloop.run(main())
