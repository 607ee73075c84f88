"""RabbitMQ (AMQP 0-9-1) as a dispatch index: one durable queue per celeriac queue.

``<prefix>.<queue>`` (``celeriac.emails``) holds one persistent message per ready job; the
body is the job id, the AMQP priority is the job's. Classic queues get ``x-max-priority``
10, so RabbitMQ hands out the highest priority first, then the oldest; quorum queues
(``CELERIAC_AMQP_QUORUM=true``) trade that ordering for replication.

A message is only a candidate id: SQL grants the lease (``service.dispatch``), and the
message is acked once the SQL transaction that looked at it committed, granted or a
duplicate (SQL holds the lease from then on: an unacked delivery held for the length of
a job would protect nothing and pin prefetch); requeued if that transaction failed.

- ``candidates`` takes messages with ``basic.get`` (the head of the queue, so priority and
  queue order hold), and with nothing ready it waits on a *delivery*: a consumer per
  requested queue with prefetch 1, cancelled as soon as something arrived. Prefetch is
  therefore bounded by what waiting workers asked for; nothing is buffered for nobody,
  and another replica's workers can take what this one's do not want.
- ``publish`` runs after the SQL commit, with publisher confirms; a message RabbitMQ
  returns as unroutable (the queue was deleted by hand) makes it declare the queue again
  and resend once. Any other failure is logged and left to ``reconcile``.
- ``reconcile`` looks, per queue, at the jobs SQL says have been ready for longer than
  the reconcile interval. A queue that no longer exists is declared again and gets every
  queued job of its queue back at once. A queue that is empty on two passes in a row
  while SQL still has such jobs lost their messages (a failed publish, a purge): the
  jobs queued both times are published again. A lost message in a queue that is not
  empty waits until it runs dry (RabbitMQ cannot say which ids it holds). Duplicates cost
  one wasted ``basic.get``: SQL grants a job once.
- The connection is supervised: lost, it is re-opened with exponential back-off
  (0.2 s … 5 s), channels and declarations are made afresh, and meanwhile dispatch
  serves from SQL, as for every broker.
- Delayed and retrying jobs stay in SQL until due; the maintenance loop promotes and
  publishes them. No RabbitMQ plugin is needed.

Plain connections with our own supervisor rather than aio-pika's robust ones: a robust
connection cannot start while RabbitMQ is down, and it replays consumers of long-polls
that have since returned; re-opening everything ourselves keeps one path for both."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import aio_pika
import aiormq
import sqlalchemy as sa
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from sqlalchemy.orm import Session

from service.brokers.base import (
    Announcements,
    Broker,
    BrokerHooks,
    BrokerUnavailable,
    Candidates,
)
from service.db import Database
from service.effects import Dispatch
from service.leases import jobs_c, queued_since
from service.signals import Signals
from service.states import JobStatus

log = logging.getLogger("celeriac.broker.amqp")

MAX_PRIORITY = 10  # job priorities are 0..9
IDLE_LANES = 32  # channels kept open for the next lease
GET_MAX = 2  # up to this many jobs from a queue: basic.get each; more: one bulk consume
BULK_IDLE = 0.05  # a bulk consume stops when no delivery came for this long
CONNECT_TIMEOUT = 5.0
CALL_TIMEOUT = 5.0
PUBLISH_TIMEOUT = 10.0
BACKOFF_MIN, BACKOFF_MAX = 0.2, 5.0
RECONCILE_LIMIT = 5000

# What a lost connection or channel raises: the call is then answered from SQL.
ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aio_pika.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
)


class PublishFailed(Exception):
    """Messages RabbitMQ did not confirm; reconcile publishes them again."""


REPAIRABLE: tuple[type[BaseException], ...] = (*ERRORS, PublishFailed)


@dataclass(frozen=True)
class Layout:
    """Names and arguments of what the service declares."""

    prefix: str = "celeriac"
    quorum: bool = False

    def queue(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def arguments(self) -> dict[str, Any]:
        if self.quorum:
            return {"x-queue-type": "quorum"}
        return {"x-max-priority": MAX_PRIORITY}


@dataclass(frozen=True, order=True)
class Candidate:
    """A delivered message, ranked as a lease must hand jobs out: queue order, then
    priority, then age (UUIDv7 ids sort by time)."""

    rank: tuple[int, int, str]
    message: AbstractIncomingMessage = field(compare=False)

    @property
    def id(self) -> str:
        return self.rank[2]


def candidate(queue_index: int, message: AbstractIncomingMessage) -> Candidate:
    return Candidate((queue_index, -(message.priority or 0), message.body.decode()), message)


def message_for(job: Dispatch) -> aio_pika.Message:
    return aio_pika.Message(
        job.id.encode(),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=job.priority,
        message_id=job.id,
        content_type="text/plain",
        headers={"queue": job.queue, "priority": job.priority},
    )


async def settle_messages(candidates: Sequence[Candidate], *, requeue: bool | None) -> None:
    """Ack (``requeue`` None) or nack. A message whose channel died meanwhile is already
    back in its queue: nothing to do. (wait=False: queue the frame, not wait for it.)"""
    for item in candidates:
        channel, tag = item.message.channel, item.message.delivery_tag
        assert tag is not None  # only unacked deliveries are candidates
        with contextlib.suppress(*ERRORS):
            if requeue is None:
                await channel.basic_ack(tag, wait=False)
            else:
                await channel.basic_nack(tag, requeue=requeue, wait=False)


class _Delivered(Candidates):
    """Unacked deliveries, ranked. Acked once SQL decided (granted, or a duplicate);
    requeued when it could not. Until then reconcile counts them as held, not lost."""

    def __init__(self, broker: AmqpBroker, queues: Sequence[str], found: list[Candidate]) -> None:
        found.sort()
        super().__init__([item.id for item in found])
        self.found = found
        self.held = Counter(queues[item.rank[0]] for item in found)
        self.holding = broker._holding
        self.holding.update(self.held)

    async def ack(self, ids: Collection[str]) -> None:
        await self._settle(ids, requeue=None)

    async def hand_back(self, ids: Collection[str], *, still_ready: bool) -> None:
        await self._settle(ids, requeue=True if still_ready else None)

    async def _settle(self, ids: Collection[str], *, requeue: bool | None) -> None:
        chosen = [item for item in self.found if item.id in ids]
        await settle_messages(chosen, requeue=requeue)
        self.found = [item for item in self.found if item.id not in ids]
        if not self.found:
            self.holding.subtract(self.held)


@dataclass
class Catch:
    """What a lease's consumers caught. It is complete at ``want`` messages. Consumer
    callbacks run as tasks, so one may land after the consumers were cancelled:
    ``closed`` sends it back to its queue."""

    want: int
    arrived: list[Candidate] = field(default_factory=list)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False

    def on_message(self, index: int) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def deliver(message: AbstractIncomingMessage) -> None:
            if self.closed:
                with contextlib.suppress(*ERRORS):
                    await message.nack(requeue=True)
                return
            self.arrived.append(candidate(index, message))
            if len(self.arrived) >= self.want:
                self.event.set()

        return deliver

    async def first(self, seconds: float) -> None:
        """Until ``want`` arrived (or a wake-up), at most ``seconds``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), seconds)

    async def burst(self) -> None:
        """Until ``want`` arrived, or deliveries paused for BULK_IDLE (another consumer
        took the rest)."""
        seen = -1
        while len(self.arrived) > seen and not self.event.is_set():
            seen = len(self.arrived)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.event.wait(), BULK_IDLE)


class Lane:
    """A channel that serves one lease at a time, so its prefetch can be set for that
    lease alone (basic.qos applies to the consumers started after it)."""

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        self._prefetch = -1

    async def prefetch(self, count: int) -> None:
        if count != self._prefetch:
            await self.channel.set_qos(prefetch_count=count, timeout=CALL_TIMEOUT)
            self._prefetch = count


class Link:
    """One live connection: channels opened on first use (and again after a channel
    error), and the queues declared through it."""

    def __init__(self, connection: AbstractConnection, layout: Layout) -> None:
        self.connection = connection
        self.layout = layout
        self.lost = asyncio.Event()
        self.catches: dict[str, Catch] = {}  # consumer tag -> the lease waiting on it
        self.events: AbstractExchange | None = None
        self._channels: dict[str, AbstractChannel] = {}
        self._lanes: list[Lane] = []
        self._declared: set[str] = set()
        connection.close_callbacks.add(self._on_close)

    def _on_close(self, *_args: Any) -> None:
        self.lost.set()
        self.wake_all()

    def wake_all(self) -> None:
        for catch in list(self.catches.values()):
            catch.event.set()

    async def channel(self, role: str) -> AbstractChannel:
        channel = self._channels.get(role)
        if channel is not None and not channel.is_closed:
            return channel
        if channel is not None:
            # A channel closes on an error such as a queue deleted under it: what we
            # declared may be gone too.
            self._declared.clear()
        confirms = role == "publish"
        channel = await self.connection.channel(
            publisher_confirms=confirms, on_return_raises=confirms
        )
        self._channels[role] = channel
        return channel

    @contextlib.asynccontextmanager
    async def lane(self) -> AsyncIterator[Lane]:
        """A channel for this lease alone, from the idle ones or new."""
        if self._lanes:
            lane = self._lanes.pop()
        else:
            channel = await self.connection.channel(publisher_confirms=False)
            underlay = await channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(self._on_consumer_cancelled)
            lane = Lane(channel)
        try:
            yield lane
        finally:
            if lane.channel.is_closed:
                self._declared.clear()  # closed by an error: a queue may be gone
            elif len(self._lanes) < IDLE_LANES:
                self._lanes.append(lane)
            else:
                await lane.channel.close()

    def _on_consumer_cancelled(self, frame: aiormq.spec.Basic.Cancel) -> None:
        # RabbitMQ cancels consumers of a deleted queue: wake their lease to look again.
        self._declared.clear()
        catch = self.catches.get(frame.consumer_tag or "")
        if catch is not None:
            catch.event.set()

    async def queue(self, channel: AbstractChannel, name: str) -> AbstractQueue:
        full = self.layout.queue(name)
        if name not in self._declared:
            await self.declare(channel, name)
        return await channel.get_queue(full, ensure=False)

    async def declare(self, channel: AbstractChannel, name: str) -> int:
        """Declare the queue (idempotent); returns how many messages it has ready."""
        queue = await channel.declare_queue(
            self.layout.queue(name),
            durable=True,
            arguments=self.layout.arguments,
            timeout=CALL_TIMEOUT,
        )
        self._declared.add(name)
        return int(queue.declaration_result.message_count or 0)

    def forget(self, name: str) -> None:
        self._declared.discard(name)

    async def close(self) -> None:
        with contextlib.suppress(*ERRORS):
            await asyncio.wait_for(self.connection.close(), CALL_TIMEOUT)


def stale_counts(session: Session, *, before: datetime) -> dict[str, int]:
    """Per queue, how many jobs have been ready since ``before``: each should have a
    message waiting by now."""
    query = (
        sa.select(jobs_c.queue, sa.func.count())
        .where(jobs_c.status == JobStatus.queued, jobs_c.run_at <= before)
        .group_by(jobs_c.queue)
    )
    return {queue: int(n) for queue, n in session.execute(query)}


class AmqpBroker(Broker):
    name = "amqp"

    def __init__(
        self,
        db: Database,
        signals: Signals,
        *,
        url: str,
        layout: Layout,
        reconcile_age_seconds: float,
    ) -> None:
        super().__init__(db, signals)
        self.url = url
        self.layout = layout
        self.reconcile_age = timedelta(seconds=reconcile_age_seconds)
        self._link: Link | None = None
        self._up = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        # Per queue: jobs a reconcile pass found queued while their queue was short of
        # messages; published again if the next pass finds the same.
        self._suspects: dict[str, set[str]] = {}
        self._holding: Counter[str] = Counter()  # per queue: messages taken, not yet acked

    # --- connection ---------------------------------------------------------------------

    async def start(self, hooks: BrokerHooks) -> None:
        self._supervisor = asyncio.create_task(self._supervise(), name="celeriac-amqp")
        # Start ready when RabbitMQ is; if it is not, serve from SQL until it is.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), CONNECT_TIMEOUT)

    async def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self._link is not None:
            await self._link.close()

    async def _supervise(self) -> None:
        delay, failures = BACKOFF_MIN, 0
        while True:
            link = await self._connect(quiet=failures > 0)
            if link is None:
                failures += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            if failures:
                log.warning("connected to RabbitMQ again after %d failed attempts", failures)
            delay, failures = BACKOFF_MIN, 0
            self._link = link
            self._up.set()
            self.signals.due_at(None)  # reconcile now: publishes may have been lost
            try:
                await link.lost.wait()
            finally:
                self._link = None
                self._up.clear()
                link.wake_all()
                await link.close()
            log.warning("lost the connection to RabbitMQ; dispatching from SQL meanwhile")

    async def _connect(self, *, quiet: bool) -> Link | None:
        try:
            connection = await aio_pika.connect(self.url, timeout=CONNECT_TIMEOUT)
        except ERRORS as exc:
            (log.debug if quiet else log.warning)("cannot reach RabbitMQ: %r", exc)
            return None
        link = Link(connection, self.layout)
        try:
            await self._subscribe(link)
        except ERRORS as exc:
            log.warning("RabbitMQ set-up failed: %r", exc)
            await link.close()
            return None
        return link

    async def _subscribe(self, link: Link) -> None:
        """Every replica binds its own exclusive queue to the events fanout, to hear
        about jobs finished and timers moved elsewhere."""
        channel = await link.channel("events")
        exchange = await channel.declare_exchange(
            self.layout.events, aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange)
        await queue.consume(self._on_event, no_ack=True)
        link.events = exchange

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        Announcements.apply(self.signals, message.body.decode())

    async def ping(self) -> None:
        link = self._link
        if link is None:
            raise ConnectionError("RabbitMQ is unreachable")
        # Not the "probe" channel: reconcile's passive declares close that one on a 404.
        channel = await link.channel("ping")
        await asyncio.wait_for(channel.get_exchange(self.layout.events), CALL_TIMEOUT)

    # --- publishing ---------------------------------------------------------------------

    async def publish(self, jobs: Sequence[Dispatch]) -> None:
        if not jobs:
            return
        link = self._link
        if link is None:
            return  # reconcile publishes them once RabbitMQ is back
        try:
            await self._publish(link, jobs)
        except REPAIRABLE as exc:
            # The jobs are committed; reconcile will publish them. Never fail the caller.
            log.warning("publish to RabbitMQ failed (%r); reconcile will repair", exc)

    async def _publish(self, link: Link, jobs: Sequence[Dispatch]) -> None:
        failed = await self._send(link, jobs)
        if failed:
            # Returned as unroutable: the queue is gone (deleted by hand). Declare it
            # again and send once more.
            for job in failed:
                link.forget(job.queue)
            failed = await self._send(link, failed)
        if failed:
            raise PublishFailed(f"{len(failed)} of {len(jobs)} messages not confirmed")

    async def _send(self, link: Link, jobs: Sequence[Dispatch]) -> list[Dispatch]:
        """Publish every job, awaiting all confirms together; return those not confirmed."""
        channel = await link.channel("publish")
        for queue in sorted({job.queue for job in jobs}):
            await link.queue(channel, queue)
        exchange = channel.default_exchange
        sends = [
            exchange.publish(
                message_for(job), self.layout.queue(job.queue), timeout=PUBLISH_TIMEOUT
            )
            for job in jobs
        ]
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
        return [
            job
            for job, outcome in zip(jobs, outcomes, strict=True)
            if isinstance(outcome, BaseException)
        ]

    async def announce(self, finished: Sequence[str], due: datetime | None) -> None:
        link = self._link
        if link is None or link.events is None:
            return
        try:
            for text in Announcements.encode(finished, due):
                await link.events.publish(aio_pika.Message(text.encode()), "", mandatory=False)
        except ERRORS as exc:
            log.warning("announce over RabbitMQ failed: %r", exc)

    # --- leasing ------------------------------------------------------------------------

    async def candidates(self, queues: Sequence[str], limit: int, wait: float) -> Candidates:
        link = self._link
        if link is None:
            raise BrokerUnavailable("RabbitMQ is unreachable")
        deadline = asyncio.get_running_loop().time() + wait
        try:
            found = await self._candidates(link, queues, limit, deadline)
        except ERRORS as exc:
            raise BrokerUnavailable(repr(exc)) from exc
        return _Delivered(self, queues, found)

    async def _candidates(
        self, link: Link, queues: Sequence[str], max_jobs: int, deadline: float
    ) -> list[Candidate]:
        async with link.lane() as lane:
            found = await self._take(link, lane, queues, max_jobs)
            left = deadline - asyncio.get_running_loop().time()
            if found or left <= 0:
                return found
            found = await self._await_delivery(link, lane, queues, max_jobs, left)
            if found and len(found) < max_jobs:
                # Woken by one message: take whatever else is ready in the same lease.
                found += await self._take(link, lane, queues, max_jobs - len(found))
            return found

    async def _take(
        self, link: Link, lane: Lane, queues: Sequence[str], want: int
    ) -> list[Candidate]:
        """What is ready now, queues in order. RabbitMQ delivers from the head of a
        queue, so the highest priority, then the oldest."""
        found: list[Candidate] = []
        try:
            for index, name in enumerate(queues):
                need = want - len(found)
                if need <= 0:
                    break
                ready = await link.declare(lane.channel, name)
                if ready:
                    found += await self._take_from(link, lane, index, name, min(need, ready))
        except BaseException:
            await settle_messages(found, requeue=True)
            raise
        return found

    async def _take_from(
        self, link: Link, lane: Lane, index: int, name: str, count: int
    ) -> list[Candidate]:
        queue = await link.queue(lane.channel, name)
        if count <= GET_MAX:  # a basic.get per message: fewest round trips for a few
            found: list[Candidate] = []
            for _ in range(count):
                message = await queue.get(no_ack=False, fail=False, timeout=CALL_TIMEOUT)
                if message is None:
                    break
                found.append(candidate(index, message))
            return found
        # Many: one consumer with prefetch = count streams them in a single burst.
        catch = Catch(count)
        await lane.prefetch(count)
        await self._consume(link, [(index, queue)], catch, Catch.burst)
        return sorted(catch.arrived)

    async def _await_delivery(
        self, link: Link, lane: Lane, queues: Sequence[str], max_jobs: int, seconds: float
    ) -> list[Candidate]:
        """Consume from every requested queue (prefetch 1 each) until a message arrives
        or ``seconds`` pass; keep what came (the best ``max_jobs``)."""
        catch = Catch(1)
        await lane.prefetch(1)
        pairs = [(index, await link.queue(lane.channel, name)) for index, name in enumerate(queues)]
        await self._consume(link, pairs, catch, partial(Catch.first, seconds=seconds))
        arrived = sorted(catch.arrived)
        await settle_messages(arrived[max_jobs:], requeue=True)
        return arrived[:max_jobs]

    @staticmethod
    async def _consume(
        link: Link,
        pairs: list[tuple[int, AbstractQueue]],
        catch: Catch,
        until: Callable[[Catch], Awaitable[None]],
    ) -> None:
        """Run consumers on ``pairs`` (queue order, queue) into ``catch`` until ``until``
        returns, then cancel them. What arrived before the cancel stays in ``catch``."""
        consumers: list[tuple[AbstractQueue, str]] = []
        try:
            for index, queue in pairs:
                tag = await queue.consume(catch.on_message(index), timeout=CALL_TIMEOUT)
                consumers.append((queue, tag))
                link.catches[tag] = catch
            await until(catch)
        except BaseException:
            await AmqpBroker._stop_consumers(link, consumers, catch)
            await settle_messages(catch.arrived, requeue=True)
            catch.arrived.clear()
            raise
        await AmqpBroker._stop_consumers(link, consumers, catch)

    @staticmethod
    async def _stop_consumers(
        link: Link, consumers: list[tuple[AbstractQueue, str]], catch: Catch
    ) -> None:
        for queue, tag in consumers:
            link.catches.pop(tag, None)
            with contextlib.suppress(*ERRORS):
                await queue.cancel(tag, timeout=CALL_TIMEOUT)
        await asyncio.sleep(0)  # let deliveries received before the cancel-ok land
        catch.closed = True

    # --- repair -------------------------------------------------------------------------

    async def reconcile(self, now: datetime) -> int:
        link = self._link
        if link is None:
            return 0
        before = now - self.reconcile_age
        expected = await self.db.read(partial(stale_counts, before=before))
        for gone in self._suspects.keys() - expected.keys():
            del self._suspects[gone]
        repaired = 0
        try:
            for queue, count in sorted(expected.items()):
                repaired += await self._reconcile_queue(link, queue, count, before)
        except REPAIRABLE as exc:
            log.warning("reconcile with RabbitMQ failed (%r); retrying next pass", exc)
        return repaired

    async def _reconcile_queue(self, link: Link, queue: str, stale: int, before: datetime) -> int:
        ready = await self._ready_count(link, queue)
        if ready is None:
            jobs = await self.db.read(
                partial(queued_since, before=None, limit=RECONCILE_LIMIT, queue=queue)
            )
            log.warning(
                "RabbitMQ queue %s was missing: declared it again, republishing %d jobs",
                self.layout.queue(queue),
                len(jobs),
            )
        elif ready or self._holding[queue]:
            # Messages are waiting: a lost one only loses its place in line, and is
            # found once the queue runs dry. (RabbitMQ cannot say which ids it holds, and
            # a direct worker's unacked messages are not counted: comparing counts would
            # publish duplicates of jobs that are merely in someone's hands.)
            self._suspects.pop(queue, None)
            return 0
        else:
            jobs = await self._confirmed_lost(queue, before)
            if not jobs:
                return 0
            log.warning(
                "RabbitMQ queue %s is empty but %d jobs are ready in SQL: republishing %d",
                self.layout.queue(queue),
                stale,
                len(jobs),
            )
        await self._publish(link, jobs)
        return len(jobs)

    async def _confirmed_lost(self, queue: str, before: datetime) -> list[Dispatch]:
        """Jobs still queued after two passes that both found their queue empty. A lease
        holds its messages unacked (uncounted) until its SQL claim commits, so one empty
        count may be a lease in flight; a whole interval later it is not."""
        jobs = await self.db.read(
            partial(queued_since, before=before, limit=RECONCILE_LIMIT, queue=queue)
        )
        suspects = self._suspects.get(queue, set())
        lost = [job for job in jobs if job.id in suspects]
        self._suspects[queue] = {job.id for job in jobs} - suspects
        return lost

    async def _ready_count(self, link: Link, queue: str) -> int | None:
        """Messages ready in the queue, or None if it did not exist (it does now)."""
        channel = await link.channel("probe")
        try:
            declared = await channel.declare_queue(
                self.layout.queue(queue), passive=True, timeout=CALL_TIMEOUT
            )
        except aiormq.exceptions.ChannelNotFoundEntity:
            link.forget(queue)
            await link.queue(await link.channel("probe"), queue)
            return None
        result = declared.declaration_result
        return int(result.message_count or 0)
