"""Redis as a dispatch index: one sorted set of ready job ids per queue.

Keys live under one hash tag, ``{<prefix>}``, so a Redis Cluster keeps them in one slot
and multi-queue pops stay atomic. Members are job ids; the score orders by priority, then
age (lowest score first). For HTTP workers Redis holds no lease: a popped id is only a
candidate, and SQL grants the lease (a job popped twice is still leased once). Workers
that speak the Redis protocol lease straight from Redis (``redis_protocol``); SQL follows
through the event stream. If Redis is unreachable, HTTP leases fall back to SQL dispatch;
if it lost data, ``reconcile`` re-adds what SQL says is queued."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from functools import partial
from importlib import resources
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sqlalchemy.orm import Session

from service.brokers import redis_protocol
from service.brokers.base import Broker, BrokerHooks
from service.brokers.sql import dispatch_message
from service.db import Database
from service.jobs import Dispatch
from service.leases import LeaseTerms, claim_by_ids, claim_from_queues, queued_since
from service.models import JobValues
from service.signals import Signals

log = logging.getLogger("celeriac.broker.redis")

REBUILD_CHUNK = 5000
RECONCILE_LIMIT = 5000
TOMBSTONE_SECONDS = 30


def _claim_by_ids(
    session: Session, *, ids: list[str], terms: Callable[[], LeaseTerms]
) -> list[JobValues]:
    return claim_by_ids(session, ids, terms())


def score(job: Dispatch) -> float:
    """Lowest first: priority (9 before 0), then the enqueue millisecond embedded in the
    UUIDv7 id. Equal scores pop in member order, and UUIDv7 ids sort by time, so jobs from
    the same millisecond still come out oldest first."""
    millis = int(job.id[:8] + job.id[9:13], 16)
    return (9 - job.priority) * 1e13 + millis


def _script(name: str) -> str:
    return resources.files("service").joinpath(f"lua/{name}").read_text()


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
        self.tag = "{" + prefix + "}"
        self.channel = f"{self.tag}:events:pubsub"
        self.stream = f"{self.tag}:events"
        self.epoch_key = f"{self.tag}:epoch"
        self.reconcile_age = timedelta(seconds=reconcile_age_seconds)
        self.serve_workers = serve_workers
        self._redis: aioredis.Redis | None = None
        self._blocking: aioredis.Redis | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pop_ready: Any = None
        self._reindex: Any = None
        self._missing: Any = None

    @property
    def wants_envelopes(self) -> bool:
        return self.serve_workers

    def ready_key(self, queue: str) -> str:
        return f"{self.tag}:ready:{queue}"

    def job_key(self, job_id: str) -> str:
        return f"{self.tag}:job:{job_id}"

    @property
    def redis(self) -> aioredis.Redis:
        assert self._redis is not None, "broker not started"
        return self._redis

    async def start(self, hooks: BrokerHooks) -> None:
        # A worker can write any bytes into the event stream: undecodable ones become
        # U+FFFD (and the event is refused) rather than failing the whole read.
        self._redis = aioredis.from_url(self.url, decode_responses=True, encoding_errors="replace")
        # Long-polls hold a connection each for their whole wait: keep them off the pool
        # that publishes and reconciles.
        self._blocking = aioredis.from_url(
            self.url,
            decode_responses=True,
            encoding_errors="replace",
            max_connections=2000,
            socket_timeout=None,
        )
        self._pop_ready = self._redis.register_script(_script("pop_ready.lua"))
        self._reindex = self._redis.register_script(_script("reindex.lua"))
        self._missing = self._redis.register_script(_script("missing.lua"))
        self._tasks.append(asyncio.create_task(self._listen(), name="celeriac-redis-listen"))
        if self.serve_workers:
            await redis_protocol.load_library(self._redis)
            ingest = redis_protocol.EventIngest(
                self.db, self._redis, self._blocking, self.stream, hooks.now, hooks.apply
            )
            self._tasks.append(asyncio.create_task(ingest.run(), name="celeriac-redis-ingest"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for client in (self._redis, self._blocking):
            if client is not None:
                await client.aclose()

    async def publish(self, jobs: Sequence[Dispatch]) -> None:
        if not jobs:
            return
        try:
            await self._index(jobs)
        except RedisError as exc:
            # The jobs are committed; reconcile will index them. Never fail the caller.
            log.warning("publish to Redis failed (%s); reconcile will repair", exc)
            self.signals.queues_ready({job.queue for job in jobs})

    async def _index(self, jobs: Sequence[Dispatch]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            if self.serve_workers:
                envelopes = await self._envelopes(jobs)
                redis_protocol.publish_commands(pipe, self.tag, jobs, envelopes, score)
            else:
                for job in jobs:
                    pipe.zadd(self.ready_key(job.queue), {job.id: score(job)})
            await pipe.execute()

    async def _envelopes(self, jobs: Sequence[Dispatch]) -> dict[str, str]:
        known = {job.id: job.envelope for job in jobs if job.envelope is not None}
        missing = [job.id for job in jobs if job.envelope is None]
        if missing:
            known.update(await self.db.read(partial(redis_protocol.load_envelopes, ids=missing)))
        return known

    async def announce(self, finished: Sequence[str], due: datetime | None) -> None:
        messages = [f"f:{','.join(finished[i : i + 500])}" for i in range(0, len(finished), 500)]
        if due is not None:
            messages.append("d:")
        if not messages:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for message in messages:
                    pipe.publish(self.channel, message)
                await pipe.execute()
        except RedisError as exc:
            log.warning("announce over Redis failed: %s", exc)

    async def cancel_requested(self, job_ids: Sequence[str]) -> None:
        if not self.serve_workers or not job_ids:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:  # only a leased job has a token; others have no hash
                pipe.hset(self.job_key(job_id), "cancel", "1")
                pipe.expire(self.job_key(job_id), 86400)
            await pipe.execute()

    async def lease(
        self,
        queues: Sequence[str],
        max_jobs: int,
        wait: float,
        terms: Callable[[], LeaseTerms],
    ) -> list[JobValues]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        keys = [self.ready_key(queue) for queue in queues]
        while True:
            try:
                ids = await self._candidates(keys, max_jobs, deadline - loop.time())
            except RedisError as exc:
                log.warning("lease from Redis failed (%s); dispatching from SQL", exc)
                return await self.db.run(
                    lambda session: claim_from_queues(session, queues, max_jobs, terms())
                )
            rows = await self.db.run(partial(_claim_by_ids, ids=ids, terms=terms))
            if rows and self.serve_workers:
                await self._drop_envelopes([row["id"] for row in rows])
            if rows or loop.time() >= deadline:
                return rows

    async def _drop_envelopes(self, job_ids: list[str]) -> None:
        """A job leased over HTTP no longer needs its envelope; a short-lived tombstone
        keeps a reconcile pass that read SQL a moment earlier from offering it again."""
        with contextlib.suppress(RedisError):
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    key = self.job_key(job_id)
                    pipe.delete(key)
                    pipe.hset(key, "done", "1")
                    pipe.expire(key, TOMBSTONE_SECONDS)
                await pipe.execute()

    async def _candidates(self, keys: list[str], max_jobs: int, wait: float) -> list[str]:
        ids: list[str] = await self._pop_ready(keys=keys, args=[max_jobs, self.tag])
        if ids or wait <= 0:
            return ids
        assert self._blocking is not None
        popped = await self._blocking.bzmpop(wait, len(keys), keys, min=True, count=max_jobs)
        if not popped:
            return []
        # BZMPOP answers [key, [[member, score], ...]].
        members = cast(list[list[str]], popped[1])
        return [pair[0] for pair in members]

    async def reconcile(self, now: datetime) -> int:
        if not await self.redis.exists(self.epoch_key):
            count = await self._rebuild()
            await self.redis.set(self.epoch_key, now.isoformat())
            log.warning("Redis dispatch index was empty or new: rebuilt %d jobs from SQL", count)
            return count
        stale = await self.db.read(
            partial(queued_since, before=now - self.reconcile_age, limit=RECONCILE_LIMIT)
        )
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
        args: list[Any] = [self.tag]
        for job in jobs:
            args += [job.id, job.queue]
        lost = set(await self._missing(args=args))
        jobs = [job for job in jobs if job.id in lost]
        if not jobs:
            return 0
        envelopes = await self._envelopes(jobs) if self.serve_workers else {}
        args = [self.tag]
        for job in jobs:
            args += [job.id, score(job), job.queue, envelopes.get(job.id, "")]
        return int(await self._reindex(args=args))

    async def ping(self) -> None:
        await self.redis.ping()

    async def _listen(self) -> None:
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            dispatch_message(self.signals, message["data"])
            except RedisError as exc:
                log.warning("Redis subscription lost (%s); retrying", exc)
                await asyncio.sleep(1.0)
