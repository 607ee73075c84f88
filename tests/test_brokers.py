"""The broker conformance suite (River's ``riverdrivertest`` is the model): the same tests
against every candidate source (SQL, Redis, RabbitMQ) with ``service.dispatch`` on top,
in process (no service process) on a real database, Redis and RabbitMQ.

Each test builds its own broker (a Redis prefix / AMQP queue prefix of its own, so a
service process of the same session is not disturbed) and uses a queue of its own on the
session's fresh database. Brokers are started as the app starts them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import (
    REDIS_HOST,
    REDIS_PORT,
    Backend,
    delete_redis_prefix,
    free_port,
    make_backend,
    unique_name,
)

from service import flow, flow_redis
from service.brokers import redis as redis_broker
from service.brokers.amqp import AmqpBroker, Layout
from service.brokers.base import Broker, BrokerHooks, BrokerUnavailable
from service.brokers.redis import RedisBroker
from service.brokers.sql import SqlBroker
from service.db import Database, create_engine
from service.jobs import insert_jobs, new_job
from service.leases import LeaseTerms, claim_by_ids, new_token
from service.models import JOBS_TABLE, JobValues
from service.runtime import Runtime
from service.schemas import JobSubmit, LimitSpec
from service.settings import Settings
from service.signals import Signals

# Longer than any test waits: a waiter that returns early was woken by an event, not by
# the shared poll.
NO_POLL_SECONDS = 30.0
FAST = 1.5  # seconds within which a woken long-poll must answer


@pytest.fixture(scope="module")
def backend(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """A database (and vhost) of this module's own, of the session backend's kind: the
    session's service process writes the session database too, and on SQLite its write
    lock would make an in-process test wait behind it."""
    workdir = tmp_path_factory.mktemp(f"brokers-{backend.name}")
    with make_backend(backend.database, backend.broker, workdir) as own:
        yield own


@dataclass
class Harness:
    runtime: Runtime
    queue: str

    @property
    def broker(self) -> Broker:
        return self.runtime.broker

    def terms(self) -> LeaseTerms:
        return LeaseTerms("w-conformance", new_token(), self.runtime.clock.now(), None, 60.0)

    async def submit(self, count: int = 1, *, priority: int = 0, queue: str = "") -> list[str]:
        """Submit as ``POST /jobs`` does (commit, then publish), returning after the
        publish (a request is answered before it)."""
        rows = [self.row(priority, queue or self.queue) for _ in range(count)]
        await self.runtime.db.run(lambda session: insert_jobs(session, rows))
        await self.runtime.after_submit(rows)
        return [row["id"] for row in rows]

    def row(self, priority: int, queue: str) -> JobValues:
        spec = JobSubmit(task="conformance.noop", queue=queue, priority=priority)
        return new_job(spec, self.runtime.clock.now(), self.runtime.defaults)

    async def lease(self, max_jobs: int = 10, wait: float = 0.0, *queues: str) -> list[str]:
        rows = await self.runtime.dispatcher.lease(
            list(queues) or [self.queue], max_jobs, wait, self.terms
        )
        return [row["id"] for row in rows]

    async def status(self, job_id: str) -> tuple[str, str | None]:
        query = sa.select(JOBS_TABLE.c.status, JOBS_TABLE.c.lease_token).where(
            JOBS_TABLE.c.id == job_id
        )
        status, token = await self.runtime.db.read(lambda s: s.execute(query).one())
        return str(status), token


def make_broker(
    backend: Backend, db: Database, signals: Signals, *, down: bool, redis_workers: bool
) -> Broker:
    prefix = unique_name("celeriac_c_")
    if backend.broker == "redis":
        port = free_port() if down else REDIS_PORT  # nothing listens on a free port
        url = f"redis://{REDIS_HOST}:{port}/{backend.redis_db}"
        return RedisBroker(db, signals, url=url, prefix=prefix, reconcile_age_seconds=0.0,
                           serve_workers=redis_workers)  # fmt: skip
    if backend.broker == "amqp":
        url = f"amqp://guest:guest@127.0.0.1:{free_port()}/" if down else backend.broker_url
        return AmqpBroker(db, signals, url=url, layout=Layout(prefix), reconcile_age_seconds=0.0)
    return SqlBroker(db, signals, fallback_seconds=NO_POLL_SECONDS)


@contextlib.asynccontextmanager
async def harness(
    backend: Backend, *, down: bool = False, redis_workers: bool = False
) -> AsyncIterator[Harness]:
    db = Database(create_engine(backend.database_url))
    signals = Signals()
    broker = make_broker(backend, db, signals, down=down, redis_workers=redis_workers)
    settings = Settings(
        database_url=backend.database_url, sql_poll_fallback_seconds=NO_POLL_SECONDS
    )
    runtime = Runtime(settings=settings, db=db, signals=signals, broker=broker)
    if not (down and backend.broker == "amqp"):  # its start would wait for RabbitMQ
        await broker.start(BrokerHooks(now=runtime.clock.now, apply=runtime.apply))
    try:
        yield Harness(runtime, unique_name("q_c_"))
    finally:
        spawned = runtime.spawned()
        for task in spawned:
            task.cancel()
        await asyncio.gather(*spawned, return_exceptions=True)
        await broker.close()
        if isinstance(broker, RedisBroker):
            delete_redis_prefix(broker.layout.prefix, backend.redis_db)
        db.dispose()


def run(backend: Backend, scenario: Callable[[Harness], Awaitable[None]], **kw: Any) -> None:
    async def main() -> None:
        async with harness(backend, **kw) as h:
            await asyncio.wait_for(scenario(h), 30)

    asyncio.run(main())


def index_only(backend: Backend) -> None:
    if backend.broker == "sql":
        pytest.skip("the SQL source holds no index: it claims and grants in one statement")


# --- the suite --------------------------------------------------------------------------


def test_publish_then_candidates_then_grant(backend: Backend) -> None:
    async def scenario(h: Harness) -> None:
        ids = await h.submit(3)
        if h.broker.holds_index:
            batch = await h.broker.candidates([h.queue], 10, 0.0)
            assert batch.ids == ids
            rows = await h.runtime.dispatcher.grant(batch, h.terms)
            assert [row["id"] for row in rows] == ids
            again = await h.broker.candidates([h.queue], 10, 0.0)
            assert again.ids == []  # acked: gone from the index
            await h.runtime.dispatcher.grant(again, h.terms)
        else:
            assert await h.lease() == ids
        for job_id in ids:
            assert (await h.status(job_id))[0] == "running"
        assert await h.lease() == []

    run(backend, scenario)


def test_an_http_grant_drops_the_envelopes_after_the_answer(backend: Backend) -> None:
    """The Redis index's ack of an HTTP grant only tidies (the envelope a Redis worker
    would have read becomes a tombstone): without flow control it runs after the lease is
    answered, off the round trip's path, and still runs."""
    if backend.broker != "redis":
        pytest.skip("the Redis index's envelopes")

    async def scenario(h: Harness) -> None:
        assert isinstance(h.broker, RedisBroker)
        [job_id] = await h.submit(1)
        job_key = f"{h.broker.layout.tag}:job:{job_id}"
        assert await h.broker.redis.hexists(job_key, "env")
        assert await h.lease() == [job_id]
        await asyncio.gather(*h.runtime.spawned())  # the ack, spawned by the grant
        assert await h.broker.redis.hgetall(job_key) == {"done": "1"}
        assert 0 < await h.broker.redis.ttl(job_key) <= 30  # flow_redis.TOMBSTONE_SECONDS

    run(backend, scenario, redis_workers=True)


_REFUSE_GRANT_ROWS = """
CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'refused for the test'; END $$;
CREATE TRIGGER {name} BEFORE INSERT ON limit_grants FOR EACH ROW EXECUTE FUNCTION {name}();
"""


def test_a_limited_grant_that_does_not_commit_gives_its_redis_slot_back(backend: Backend) -> None:
    """With Redis workers served, Redis arbitrates the limit slots of an HTTP grant inside
    the claim's transaction (service/flow_redis.py). A claim whose grant the database
    refuses (here a trigger refuses its grant rows: the direct claim's commit, then the
    pool's) gives the slot back: once the database accepts again, the next claim gets
    the job. A slot left taken would keep the key (``max_running`` 1) full."""
    if backend.broker != "redis" or backend.database != "postgres":
        pytest.skip("Redis's slots for HTTP grants; the refusing trigger is PostgreSQL's")

    async def scenario(h: Harness) -> None:
        db, now = h.runtime.db, h.runtime.clock.now()
        await db.run(lambda s: flow.put_limit(s, "sl-*", LimitSpec(max_running=1), now))
        await flow.sync_redis(h.runtime)  # the rule, as the Lua functions read it
        await db.run(flow.snapshot)  # fresh: the direct claim takes the first try
        row = new_job(JobSubmit(task="t", queue=h.queue, limits=["sl-1"]), now, h.runtime.defaults)
        await db.run(lambda session: insert_jobs(session, [row]))
        await h.runtime.after_submit([row])
        arbiter = flow_redis.arbiter(h.broker)
        assert arbiter is not None

        def terms() -> LeaseTerms:
            t = h.terms()
            return LeaseTerms(t.worker, t.token, t.now, t.lease_seconds, t.default_seconds,
                              slot_arbiter=arbiter)  # fmt: skip

        trigger = unique_name("refuse_")
        await db.run(lambda s: s.execute(sa.text(_REFUSE_GRANT_ROWS.format(name=trigger))))
        try:
            with pytest.raises(sa.exc.DBAPIError, match="refused for the test"):
                await h.runtime.dispatcher.lease([h.queue], 1, 0.0, terms)
        finally:
            drop = f"DROP TRIGGER {trigger} ON limit_grants; DROP FUNCTION {trigger}()"
            await db.run(lambda s: s.execute(sa.text(drop)))
        assert (await h.status(row["id"]))[0] == "queued"
        await db.run(flow.snapshot)
        leased = await h.runtime.dispatcher.lease([h.queue], 1, 0.0, terms)
        assert [r["id"] for r in leased] == [row["id"]]

    run(backend, scenario, redis_workers=True)


def test_order_is_priority_then_age_then_queue_order(backend: Backend) -> None:
    async def scenario(h: Harness) -> None:
        other = unique_name("q_c_")
        low = await h.submit(2, priority=1)
        high = await h.submit(2, priority=7)
        first = await h.submit(1, priority=0, queue=other)
        taken = [job for _ in range(5) for job in await h.lease(1, 0.0, other, h.queue)]
        assert taken == first + high + low

    run(backend, scenario)


def test_hand_back_offers_again_in_place(backend: Backend) -> None:
    index_only(backend)

    async def scenario(h: Harness) -> None:
        ids = await h.submit(3)
        batch = await h.broker.candidates([h.queue], 2, 0.0)
        assert batch.ids == ids[:2]
        await batch.hand_back(batch.ids, still_ready=True)  # as when SQL failed
        assert await h.lease() == ids

    run(backend, scenario)


def test_a_stale_candidate_is_not_granted_twice(backend: Backend) -> None:
    async def scenario(h: Harness) -> None:
        [job_id] = await h.submit(1)
        elsewhere = h.terms()
        granted = await h.runtime.db.run(lambda s: claim_by_ids(s, [job_id], elsewhere))
        assert [row["id"] for row in granted] == [job_id]
        if h.broker.holds_index:
            batch = await h.broker.candidates([h.queue], 10, 0.0)
            assert batch.ids == [job_id]  # the index still believes it ready
            assert await h.runtime.dispatcher.grant(batch, h.terms) == []
        assert await h.lease() == []
        assert await h.status(job_id) == ("running", elsewhere.token)

    run(backend, scenario)


def test_a_short_answer_is_topped_up_from_sql(backend: Backend) -> None:
    """A job committed but not published yet (``POST /jobs`` answers first) is ready."""

    async def scenario(h: Harness) -> None:
        published = await h.submit(1)
        unpublished = [h.row(0, h.queue)]
        await h.runtime.db.run(lambda session: insert_jobs(session, unpublished))
        assert await h.lease() == [*published, unpublished[0]["id"]]

    run(backend, scenario)


def test_a_long_poll_wakes_on_publish(backend: Backend) -> None:
    async def scenario(h: Harness) -> None:
        await h.lease()  # connections warm
        waiting = asyncio.create_task(h.lease(10, 20.0))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        started = time.monotonic()
        ids = await h.submit(1)
        assert await asyncio.wait_for(waiting, FAST) == ids
        assert time.monotonic() - started < FAST

    run(backend, scenario)


def test_a_long_poll_with_nothing_ready_waits_its_time(backend: Backend) -> None:
    async def scenario(h: Harness) -> None:
        started = time.monotonic()
        assert await h.lease(10, 0.8) == []
        assert 0.7 < time.monotonic() - started < 0.8 + FAST

    run(backend, scenario)


def test_reconcile_reoffers_what_the_index_lost(backend: Backend) -> None:
    async def scenario(h: Harness) -> None:
        ids = await h.submit(3)
        broker = h.broker
        if isinstance(broker, RedisBroker):
            delete_redis_prefix(broker.layout.prefix, backend.redis_db)  # FLUSHDB, for us
        elif isinstance(broker, AmqpBroker):
            await purge(broker, h.queue)
        if broker.holds_index:
            assert (await broker.candidates([h.queue], 10, 0.0)).ids == []
        await asyncio.sleep(0.01)  # reconcile only republishes jobs ready before "now"
        repaired = 0
        for _ in range(2):  # RabbitMQ: a queue found empty on two passes lost its messages
            repaired += await broker.reconcile(h.runtime.clock.now())
        # (On a shared database it may re-offer other tests' queued jobs too.)
        assert repaired >= (0 if backend.broker == "sql" else 3)
        assert await h.lease() == ids

    run(backend, scenario)


def test_reconcile_walks_a_backlog_larger_than_one_pass(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push lost behind more stale queued jobs than one pass reads (here 2 a pass) is
    found all the same: passes go on where the last one stopped."""
    if backend.broker != "redis":
        pytest.skip("the Redis index's reconcile")
    monkeypatch.setattr(redis_broker, "RECONCILE_LIMIT", 2)

    async def scenario(h: Harness) -> None:
        ids = await h.submit(5)
        await h.broker.reconcile(h.runtime.clock.now())  # the first pass: the index's epoch
        lost = max(ids)  # the newest: behind every other stale job in id order
        batch = await h.broker.candidates([h.queue], 10, 0.0)
        assert sorted(batch.ids) == sorted(ids)
        await batch.hand_back([i for i in batch.ids if i != lost], still_ready=True)
        await asyncio.sleep(0.01)  # reconcile only re-adds jobs ready before "now"
        stale = await h.runtime.db.read(
            lambda session: session.execute(
                sa.select(sa.func.count()).where(JOBS_TABLE.c.status == "queued")
            ).scalar_one()
        )  # other tests' queued jobs share the database, and the passes
        for _ in range(stale // 2 + 10):  # a margin for jobs other tests queue meanwhile
            await h.broker.reconcile(h.runtime.clock.now())
        # In the index again (a lease would find it anyway: dispatch tops up from SQL).
        assert sorted((await h.broker.candidates([h.queue], 10, 0.0)).ids) == sorted(ids)

    run(backend, scenario)


async def purge(broker: AmqpBroker, queue: str) -> None:
    link = broker._link
    assert link is not None
    channel = await link.channel("test-purge")
    await (await link.queue(channel, queue)).purge()


def test_an_outage_falls_back_to_sql_and_honours_wait(backend: Backend) -> None:
    index_only(backend)

    async def scenario(h: Harness) -> None:
        with pytest.raises(BrokerUnavailable):
            await h.broker.candidates([h.queue], 1, 0.0)
        ids = await h.submit(2)  # committed; the publish fails and is left to reconcile
        assert await h.lease() == ids  # served from SQL
        started = time.monotonic()
        assert await h.lease(10, 0.8) == []  # waits, rather than answering at once
        assert time.monotonic() - started > 0.7
        waiting = asyncio.create_task(h.lease(10, 20.0))
        await asyncio.sleep(0.2)
        more = await h.submit(1)
        assert await asyncio.wait_for(waiting, FAST) == more  # a commit here wakes it

    run(backend, scenario, down=True)


def test_redis_worker_leases_are_granted_once_through_the_same_statement(
    backend: Backend,
) -> None:
    """The Redis worker protocol leases from the index itself: dispatch never tops up
    from SQL over it (SQL hears of those leases late), and the event stream mirrors the
    lease into SQL with the one grant statement."""
    if backend.broker != "redis":
        pytest.skip("the Redis worker protocol")

    async def scenario(h: Harness) -> None:
        assert isinstance(h.broker, RedisBroker)
        [job_id] = await h.submit(1)
        layout, redis = h.broker.layout, h.broker.redis
        leased = await redis.fcall("celeriac_v1_lease", 2, layout.events, layout.ready(h.queue),
                                   "1", "w-redis", "1", "30000")  # fmt: skip
        assert len(leased) == 1 and '"attempt":1' in leased[0], leased  # the envelope
        token = json.loads(leased[0])["lease"]["token"]
        assert await h.lease() == []  # queued in SQL until the event lands: not granted
        for _ in range(200):
            if await h.status(job_id) == ("running", token):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(await h.status(job_id))

    run(backend, scenario, redis_workers=True)
