"""The Redis worker's own connections (workers/python/celeriac/_resp.py), against the real
Redis. Both clients (plain sockets with hiredis, and redis-py for the URLs the plain one
does not speak) must behave alike. Replies come back in order, with an error in its
command's place. A URL's database and user are used. A lost, refused or timed-out
connection is ``RedisUnavailable``, and the next call connects again. Threads each get
their own replies. The plain client reads a URL as redis-py does, and a worker on it
never imports redis-py."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celeriac._resp import (
    PlainRedis,
    RedisClient,
    RedisPyRedis,
    RedisUnavailable,
    ReplyError,
    connect,
    plain_endpoint,
)
from conftest import REDIS_HOST, REDIS_PORT, require_available

DB = 11
URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{DB}"
# An option the plain client does not read: the same Redis, through redis-py.
THROUGH_REDIS_PY = f"{URL}?socket_connect_timeout=5"


@pytest.fixture(params=["plain", "redis-py"])
def client(request: pytest.FixtureRequest) -> Iterator[RedisClient]:
    require_available("redis")
    url = URL if request.param == "plain" else THROUGH_REDIS_PY
    made = connect(url, socket_timeout=5, blocking_timeout=5)
    assert type(made) is (PlainRedis if request.param == "plain" else RedisPyRedis)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def key() -> Iterator[str]:
    require_available("redis")
    prefix = f"{{resptest-{uuid.uuid4().hex[:8]}}}"
    yield prefix
    direct = redis.Redis.from_url(URL)
    try:
        for name in direct.scan_iter(match=f"{prefix}*"):
            direct.delete(name)
    finally:
        direct.close()


def test_replies_come_in_order_with_an_error_in_its_place(client: RedisClient, key: str) -> None:
    replies = client.pipeline([
        ("SET", f"{key}:a", "1"),
        ("INCR", f"{key}:a"),
        ("LPUSH", f"{key}:a", "x"),  # the wrong type: this command's failure alone
        ("GET", f"{key}:a"),
        ("GET", f"{key}:missing"),
    ])  # fmt: skip
    assert replies[:2] == [b"OK", 2]
    assert isinstance(replies[2], ReplyError) and str(replies[2]).startswith("WRONGTYPE")
    assert replies[3:] == [b"2", None]


def test_the_database_of_the_url_is_selected(client: RedisClient, key: str) -> None:
    client.pipeline([("SET", f"{key}:db", "here")])
    direct = redis.Redis.from_url(URL)
    other = redis.Redis.from_url(f"redis://{REDIS_HOST}:{REDIS_PORT}/0")
    try:
        assert direct.get(f"{key}:db") == b"here"
        assert other.get(f"{key}:db") is None
    finally:
        direct.close()
        other.close()


def test_a_blocking_pop_waits_then_answers(client: RedisClient, key: str) -> None:
    assert client.blocking("BLPOP", f"{key}:list", 0.05) is None
    pusher = threading.Timer(0.1, lambda: client.pipeline([("RPUSH", f"{key}:list", "v")]))
    pusher.start()
    try:
        woken = client.blocking("BLPOP", f"{key}:other", f"{key}:list", 5)
    finally:
        pusher.join()
    assert list(woken) == [f"{key}:list".encode(), b"v"]
    with pytest.raises(ReplyError):
        client.blocking("BLPOP", f"{key}:list", "not-a-timeout")


def test_an_idle_connection_redis_closed_is_replaced(client: RedisClient, key: str) -> None:
    """Redis restarted, or killed the connection, between two calls: the next call
    goes out on a new connection rather than failing."""
    [client_id] = client.pipeline([("CLIENT", "ID")])
    _kill(client_id)
    [again] = client.pipeline([("CLIENT", "ID")])
    assert again != client_id


def test_a_connection_lost_in_a_wait_is_unavailable_then_reconnects(
    client: RedisClient, key: str
) -> None:
    before = _client_ids()
    failed: list[BaseException] = []

    def wait() -> None:
        try:
            client.blocking("BLPOP", f"{key}:never", 10)
        except BaseException as exc:
            failed.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    deadline = time.monotonic() + 5
    while not (blocked := _client_ids(in_blpop=True) - before):
        assert time.monotonic() < deadline, "the wait never reached Redis"
        time.sleep(0.01)
    _kill(blocked.pop())
    waiter.join(10)
    assert len(failed) == 1 and isinstance(failed[0], RedisUnavailable), failed
    assert client.blocking("BLPOP", f"{key}:never", 0.05) is None


def _client_ids(*, in_blpop: bool = False) -> set[int]:
    direct = redis.Redis.from_url(URL)
    try:
        clients = direct.client_list()
    finally:
        direct.close()
    return {
        int(c["id"])
        for c in clients
        if not in_blpop or (c["cmd"] == "blpop" and c["db"] == str(DB))
    }


def _kill(client_id: int) -> None:
    killer = redis.Redis.from_url(URL)
    try:
        assert killer.execute_command("CLIENT", "KILL", "ID", client_id) == 1
    finally:
        killer.close()


@pytest.mark.parametrize("through", ["plain", "redis-py"])
def test_a_refused_connection_is_unavailable(through: str) -> None:
    url = "redis://127.0.0.1:1/0" + ("" if through == "plain" else "?socket_connect_timeout=2")
    refused = connect(url, socket_timeout=2, blocking_timeout=2)
    try:
        with pytest.raises(RedisUnavailable):
            refused.pipeline([("PING",)])
        with pytest.raises(RedisUnavailable):
            refused.blocking("BLPOP", "{resptest}:none", 1)
    finally:
        refused.close()


@pytest.mark.parametrize("through", ["plain", "redis-py"])
def test_a_wait_past_the_socket_timeout_is_unavailable(through: str, key: str) -> None:
    """The blocking connection's socket timeout bounds a wait that Redis does not end
    (the worker's is the poll wait plus 30 s); the next wait connects again."""
    require_available("redis")
    url = URL if through == "plain" else THROUGH_REDIS_PY
    short = connect(url, socket_timeout=5, blocking_timeout=0.2)
    try:
        with pytest.raises(RedisUnavailable):
            short.blocking("BLPOP", f"{key}:never", 3)
        assert short.blocking("BLPOP", f"{key}:never", 0.05) is None
    finally:
        short.close()


def test_a_user_and_password_in_the_url_are_used(key: str) -> None:
    require_available("redis")
    admin = redis.Redis.from_url(URL)
    user, secret = f"resptest-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin.execute_command("ACL", "SETUSER", user, "on", f">{secret}", "~*", "+@all")
    try:
        base = f"{REDIS_HOST}:{REDIS_PORT}/{DB}"
        good = connect(f"redis://{user}:{secret}@{base}", socket_timeout=5, blocking_timeout=5)
        assert isinstance(good, PlainRedis)
        try:
            assert good.pipeline([("ACL", "WHOAMI")]) == [user.encode()]
        finally:
            good.close()
        bad = connect(f"redis://{user}:wrong@{base}", socket_timeout=5, blocking_timeout=5)
        try:
            with pytest.raises(RedisUnavailable, match="refused"):
                bad.pipeline([("PING",)])
        finally:
            bad.close()
    finally:
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()


def test_threads_each_get_their_own_replies(key: str) -> None:
    require_available("redis")
    shared = connect(URL, socket_timeout=5, blocking_timeout=5)
    wrong: list[Any] = []

    def run(n: int) -> None:
        for i in range(200):
            echoed = shared.pipeline([("ECHO", f"{n}-{i}"), ("ECHO", f"{n}-{i}-b")])
            if echoed != [f"{n}-{i}".encode(), f"{n}-{i}-b".encode()]:
                wrong.append(echoed)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    shared.close()
    assert wrong == []


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost",
        "redis://127.0.0.1:6380",
        "redis://127.0.0.1:6379/3",
        "redis://:secret@127.0.0.1/2",
        "redis://user:p%40ss@127.0.0.1:6379/4",
        "redis://user:@host/1",
        "redis://127.0.0.1/2?db=5",
        "unix:///run/redis/redis.sock",
        "unix://:secret@/run/redis/redis.sock?db=3",
    ],
)
def test_a_plain_url_reads_as_redis_py_reads_it(url: str) -> None:
    from redis.connection import parse_url

    endpoint = plain_endpoint(url)
    assert endpoint is not None
    options = parse_url(url)
    assert endpoint.db == int(options.get("db", 0))
    assert endpoint.username == options.get("username")
    assert endpoint.password == options.get("password")
    if url.startswith("unix:"):
        assert endpoint.path == options["path"]
    else:
        assert (endpoint.host, endpoint.port) == (
            options.get("host", "localhost"),
            options.get("port", 6379),
        )


@pytest.mark.parametrize(
    "url",
    [
        "rediss://127.0.0.1:6380/0",
        f"{URL}?socket_timeout=3",
        f"{URL}?ssl_cert_reqs=none",
        "redis://127.0.0.1/not-a-number",
        "redis://127.0.0.1:99999/0",
        "unix://",
        "redis://127.0.0.1/0#fragment",
    ],
)
def test_what_the_plain_client_does_not_speak_is_left_to_redis_py(url: str) -> None:
    assert plain_endpoint(url) is None


PROBE = """
import json, sys
from celeriac._transport_redis import RedisTransport
transport = RedisTransport(sys.argv[1], prefix=sys.argv[2], worker="probe",
                           queues=["q"], lease_seconds=5, poll_wait=0)
try:
    transport.lease(1)  # no functions loaded here: an error, but one from Redis
except Exception as exc:
    error = type(exc).__name__
else:
    error = None
transport.close()
print(json.dumps({"redis_py": "redis" in sys.modules, "error": error}))
"""


def test_a_worker_on_a_plain_url_never_imports_redis_py() -> None:
    """redis-py's import is about 100 ms of a Redis worker's start (issue 14)."""
    require_available("redis")
    url, prefix = f"redis://{REDIS_HOST}:{REDIS_PORT}/15", f"resptest-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    try:
        probe = subprocess.run(
            [sys.executable, "-c", PROBE, url, prefix],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    finally:
        direct = redis.Redis.from_url(url)
        for name in direct.scan_iter(match=f"{{{prefix}}}*"):  # the lease's counter
            direct.delete(name)
        direct.close()
    found = json.loads(probe.stdout)
    assert found["redis_py"] is False, found
    # Database 15 holds no celeriac functions (or does: either way Redis answered).
    assert found["error"] in (None, "CeleriacError"), (found, time.monotonic() - started)
