"""Redis as a dispatch index: one sorted set of ready job ids per queue.

Keys live under one hash tag (``RedisLayout``), so a Redis Cluster keeps them in one slot
and multi-queue pops stay atomic. Members are job ids; the score orders by priority, then
age (lowest score first). A popped id is only a candidate for an HTTP lease: SQL grants
it. Workers that speak the Redis protocol lease straight from Redis (``redis_protocol``);
SQL follows through the event stream. If Redis lost data, ``reconcile`` re-adds what SQL
says is queued."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from functools import partial
from importlib import resources
from typing import Any, cast

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from service import flow_redis
from service.brokers import redis_link, redis_protocol
from service.brokers.base import (
    Announcements,
    Broker,
    BrokerHooks,
    BrokerUnavailable,
    Candidates,
)
from service.brokers.redis_link import RedisCalls
from service.db import Database
from service.effects import Dispatch, Effects
from service.leases import queued_since
from service.signals import Signals

log = logging.getLogger("celeriac.broker.redis")

REBUILD_CHUNK = 5000
RECONCILE_LIMIT = 5000
CLOSE_SECONDS = 2.0


class RedisLayout:
    """Every Redis key the service and the Redis worker protocol use (a public contract:
    docs/protocol.md, and the header of service/lua/celeriac.lua)."""

    def __init__(self, prefix: str = "celeriac") -> None:
        self.prefix = prefix
        self.tag = "{" + prefix + "}"  # one hash tag: a cluster keeps every key in one slot
        self.events = f"{self.tag}:events"
        self.pubsub = f"{self.tag}:events:pubsub"
        self.epoch = f"{self.tag}:epoch"

    def ready(self, queue: str) -> str:
        return f"{self.tag}:ready:{queue}"

    def job(self, job_id: str) -> str:
        return f"{self.tag}:job:{job_id}"

    def wake(self, queue: str) -> str:
        return f"{self.tag}:wake:{queue}"


class LuaScripts:
    """Every Lua file of service/lua/, loaded one way: the worker protocol's library
    (``celeriac_v1``) with FUNCTION LOAD, since workers call its functions by name; the
    service's own scripts by SHA (EVALSHA, sent again by redis-py after a NOSCRIPT)."""

    LIBRARY = "celeriac"

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        folder = resources.files("service").joinpath("lua")
        self.sources = {
            entry.name.removesuffix(".lua"): entry.read_text()
            for entry in folder.iterdir()
            if entry.name.endswith(".lua")
        }
        self.scripts = {
            name: client.register_script(code)
            for name, code in self.sources.items()
            if name != self.LIBRARY
        }

    def __getitem__(self, name: str) -> AsyncScript:
        return self.scripts[name]

    async def run(
        self, calls: RedisCalls, name: str, keys: Sequence[str] = (), args: Sequence[Any] = ()
    ) -> Any:
        """The script ``name`` over ``calls`` (the hot path's link)."""
        return await calls.script(self.scripts[name].sha, self.sources[name], [*keys], [*args])

    async def load_library(self) -> None:
        await self.client.function_load(self.sources[self.LIBRARY], replace=True)


def score(job: Dispatch) -> float:
    """Lowest first: priority (9 before 0), then the enqueue millisecond embedded in the
    UUIDv7 id. Equal scores pop in member order, and UUIDv7 ids sort by time, so jobs from
    the same millisecond still come out oldest first."""
    millis = int(job.id[:8] + job.id[9:13], 16)
    return (9 - job.priority) * 1e13 + millis


class _Popped(Candidates):
    """Ids popped from their ready sets: already out of other hands. Handed back still
    ready (SQL failed), they return to their set with their score. Their ack drops the
    envelopes Redis workers would have read: a Redis round trip the lease's answer need
    not wait for (under flow control it does: a hash may hold the lease's limit slots)."""

    ack_may_wait = True

    def __init__(self, broker: RedisBroker, entries: list[tuple[str, str, str]]) -> None:
        super().__init__([job_id for _key, job_id, _score in entries])
        self.broker = broker
        self.entries = entries

    async def ack(self, ids: Collection[str]) -> None:
        if self.broker.serve_workers and ids:
            await self.broker.drop_envelopes(ids)

    async def hand_back(self, ids: Collection[str], *, still_ready: bool) -> None:
        back = [(key, job_id, s) for key, job_id, s in self.entries if job_id in ids]
        if not still_ready or not back:
            return  # SQL says not leasable: it is published again if it becomes ready
        with contextlib.suppress(RedisError):  # lost: reconcile re-adds it
            async with self.broker.redis.pipeline(transaction=False) as pipe:
                for key, job_id, s in back:
                    pipe.zadd(key, {job_id: float(s)})
                await pipe.execute()


class RedisBroker(Broker):
    name = "redis"

    def __init__(
        self,
        db: Database,
        signals: Signals,
        *,
        url: str,
        prefix: str,
        reconcile_age_seconds: float,
        serve_workers: bool,
    ) -> None:
        super().__init__(db, signals)
        self.url = url
        self.layout = RedisLayout(prefix)
        self.reconcile_age = timedelta(seconds=reconcile_age_seconds)
        self._reconciled_to = ""  # where the next reconcile pass goes on (``reconcile``)
        self.serve_workers = serve_workers
        self.grants_outside_sql = serve_workers
        self._redis: aioredis.Redis | None = None
        self._blocking: aioredis.Redis | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lua: LuaScripts | None = None
        # The hot path's short commands (publish, pop, acknowledge, announce): one
        # pipelined connection, a third of redis-py's cost per command (redis_link.py).
        self._calls: RedisCalls | None = None
        # HTTP grants of limited jobs ask Redis for their slots (service/flow_redis.py).
        self.slot_arbiter: flow_redis.SlotArbiter | None = None
        self.closing = False  # set first at close: the loops end even if a cancel is lost
        self._publish_failing = False  # logged once until a publish succeeds again

    @property
    def redis(self) -> aioredis.Redis:
        assert self._redis is not None, "broker not started"
        return self._redis

    @property
    def calls(self) -> RedisCalls:
        assert self._calls is not None, "broker not started"
        return self._calls

    @property
    def lua(self) -> LuaScripts:
        assert self._lua is not None, "broker not started"
        return self._lua

    async def start(self, hooks: BrokerHooks) -> None:
        # A worker can write any bytes into the event stream: undecodable ones become
        # U+FFFD (and the event is refused) rather than failing the whole read.
        self._redis = aioredis.from_url(self.url, decode_responses=True, encoding_errors="replace")
        # Long-polls hold a connection each for their whole wait: keep them off the pool
        # that publishes and reconciles. (Used only where the link is not: redis_link.py.)
        self._blocking = aioredis.from_url(
            self.url,
            decode_responses=True,
            encoding_errors="replace",
            max_connections=2000,
            socket_timeout=None,
        )
        self._lua = LuaScripts(self._redis)
        self._calls = redis_link.for_url(self.url, self._redis, self._blocking)
        self._tasks.append(asyncio.create_task(self._listen(), name="celeriac-redis-listen"))
        if self.serve_workers:
            await self.lua.load_library()
            self.slot_arbiter = flow_redis.SlotArbiter(self.url, self.layout)
            ingest = redis_protocol.EventIngest(self, hooks)
            self._tasks.append(asyncio.create_task(ingest.run(), name="celeriac-redis-ingest"))

    async def close(self) -> None:
        self.closing = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded, like every shutdown step: a loop stuck in a blocking read (up to its
            # 5 s block) is left to end by itself; it sees ``closing`` when it returns.
            await asyncio.wait(self._tasks, timeout=CLOSE_SECONDS)
        if self._calls is not None:
            await self._calls.close()
        for client in (self._redis, self._blocking):
            if client is not None:
                await client.aclose()
        if self.slot_arbiter is not None:
            self.slot_arbiter.close()

    async def publish(self, jobs: Sequence[Dispatch]) -> None:
        if not jobs:
            return
        try:
            await self._index(jobs)
        except RedisError as exc:
            # The jobs are committed; reconcile will index them. Never fail the caller, and
            # say so once per outage, not once per group commit.
            if not self._publish_failing:
                log.warning("publish to Redis failed (%s); reconcile will repair", exc)
            self._publish_failing = True
        else:
            if self._publish_failing:
                log.warning("publishing to Redis works again")
            self._publish_failing = False

    async def _index(self, jobs: Sequence[Dispatch]) -> None:
        if not self.serve_workers:
            await self.calls.many(*self._add_ids(jobs, wake=False))
            return
        fresh = [job for job in jobs if not job.reoffer]
        envelopes = await self._envelopes(fresh)
        args: list[Any] = [self.layout.tag]
        for job in fresh:
            env = envelopes.get(job.id)
            if env is not None:  # None: no longer queued in SQL, nothing to offer
                args += [job.id, score(job), job.queue, env]
        if len(args) > 1:  # envelopes, ready-set entries and wake-ups: one command
            await self.lua.run(self.calls, "publish", args=args)
        if reoffered := [job for job in jobs if job.reoffer]:
            await self.calls.many(*self._add_ids(reoffered, wake=True))

    def _add_ids(self, jobs: Sequence[Dispatch], *, wake: bool) -> list[tuple[Any, ...]]:
        """Ready-set entries only: one ZADD per queue, whatever the number of jobs (and a
        wake-up token per queue for idle Redis-protocol workers)."""
        by_queue: dict[str, list[Any]] = {}
        for job in jobs:
            by_queue.setdefault(job.queue, []).extend((score(job), job.id))
        commands: list[tuple[Any, ...]] = []
        for queue, members in by_queue.items():
            commands.append(("ZADD", self.layout.ready(queue), *members))
            if wake:
                commands.append(("LPUSH", self.layout.wake(queue), "1"))
                commands.append(("LTRIM", self.layout.wake(queue), 0, 63))
        return commands

    async def _envelopes(self, jobs: Sequence[Dispatch]) -> dict[str, str]:
        """Built from the values the publisher had (a submit), else read from SQL."""
        known = {
            job.id: redis_protocol.envelope(job.values) for job in jobs if job.values is not None
        }
        missing = [job.id for job in jobs if job.values is None]
        if missing:
            known.update(await self.db.read(partial(redis_protocol.load_envelopes, ids=missing)))
        return known

    async def announce(self, finished: Sequence[str], due: datetime | None) -> None:
        messages = Announcements.encode(finished, due)
        if not messages:
            return
        try:
            await self.calls.many(*[("PUBLISH", self.layout.pubsub, m) for m in messages])
        except RedisError as exc:
            log.warning("announce over Redis failed: %s", exc)

    async def after_commit(self, effects: Effects) -> None:
        """Redis workers learn of a cancellation from their job hash (heartbeat); the
        limit slots of the leases that ended free (service/flow_redis.py); a pending job
        made final without a lease (cancelled, expired) loses its envelope, so no Redis
        worker leases it any more."""
        if not self.serve_workers:
            return
        if effects.ended:
            await flow_redis.free_ended(self, effects)
            withdrawn = [e.id for e in effects.ended if e.token is None and e.started_at is None]
            if withdrawn:
                await self.drop_envelopes(withdrawn)
        if not effects.cancelling:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in effects.cancelling:  # only a leased job has a token
                    pipe.hset(self.layout.job(job_id), "cancel", "1")
                    pipe.expire(self.layout.job(job_id), 86400)
                await pipe.execute()
        except RedisError as exc:  # committed: never fail the caller for it
            log.warning("telling Redis workers of a cancellation failed: %s", exc)

    async def candidates(self, queues: Sequence[str], limit: int, wait: float) -> Candidates:
        keys = [self.layout.ready(queue) for queue in queues]
        try:
            return _Popped(self, await self._pop(keys, limit, wait))
        except RedisError as exc:
            raise BrokerUnavailable(str(exc)) from exc

    async def _pop(self, keys: list[str], limit: int, wait: float) -> list[tuple[str, str, str]]:
        flat: list[str] = await self.lua.run(
            self.calls, "pop_ready", keys=keys, args=[limit, self.layout.tag]
        )
        # Redis rounds a blocking timeout down to whole milliseconds, and 0 blocks for
        # ever: what is left of a long-poll under a millisecond is no wait at all.
        if flat or wait < 0.001:
            return [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]
        popped = await self.calls.blocking("BZMPOP", wait, len(keys), *keys, "MIN", "COUNT", limit)
        if not popped:
            return []
        # BZMPOP answers [key, [[member, score], ...]].
        key, members = cast(str, popped[0]), cast(list[list[str]], popped[1])
        return [(key, pair[0], pair[1]) for pair in members]

    async def drop_envelopes(self, job_ids: Collection[str]) -> None:
        """A job leased over HTTP no longer needs its envelope; a short-lived tombstone
        keeps a reconcile pass that read SQL a moment earlier from offering it again (one
        whose hash holds its lease's limit slots keeps them: service/flow_redis.py)."""
        with contextlib.suppress(RedisError):
            await flow_redis.leased(self, list(job_ids))

    async def reconcile(self, now: datetime) -> int:
        if self.serve_workers:  # limit slots whose freeing was lost
            await flow_redis.repair(self, self.db)
        if not await self.redis.exists(self.layout.epoch):
            count = await self._rebuild()
            await self.redis.set(self.layout.epoch, now.isoformat())
            log.warning("Redis dispatch index was empty or new: rebuilt %d jobs from SQL", count)
            return count
        stale = await self.db.read(
            partial(queued_since, before=now - self.reconcile_age, limit=RECONCILE_LIMIT,
                    after_id=self._reconciled_to)
        )  # fmt: skip
        # A backlog larger than a pass is walked a pass at a time, in id order, then from
        # the start again: a lost push behind thousands of older queued jobs (a paused
        # queue's, or one nobody works) is found too, not only among the oldest.
        self._reconciled_to = stale[-1].id if len(stale) == RECONCILE_LIMIT else ""
        return await self._reindex_jobs(stale)

    async def _rebuild(self) -> int:
        after, total = "", 0
        while True:
            chunk = await self.db.read(
                partial(queued_since, before=None, limit=REBUILD_CHUNK, after_id=after)
            )
            if not chunk:
                return total
            total += await self._reindex_jobs(chunk)
            after = chunk[-1].id

    async def _reindex_jobs(self, jobs: Sequence[Dispatch]) -> int:
        """Re-add lost entries without ending any lease a Redis worker holds."""
        if not jobs:
            return 0
        args: list[Any] = [self.layout.tag]
        for job in jobs:
            args += [job.id, job.queue]
        lost = set(await self.lua["missing"](args=args))
        jobs = [job for job in jobs if job.id in lost]
        if not jobs:
            return 0
        envelopes = await self._envelopes(jobs) if self.serve_workers else {}
        args = [self.layout.tag]
        for job in jobs:
            args += [job.id, score(job), job.queue, envelopes.get(job.id, "")]
        return int(await self.lua["reindex"](args=args))

    async def ping(self) -> None:
        await self.redis.ping()

    async def _listen(self) -> None:
        heard = partial(Announcements.apply, self.signals)
        while not self.closing:
            try:
                await self.calls.listen(self.layout.pubsub, heard)
            except RedisError as exc:
                log.warning("Redis subscription lost (%s); retrying", exc)
                await asyncio.sleep(1.0)
