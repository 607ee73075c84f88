"""The events stream (``GET /events``, Server-Sent Events): job state changes as they
commit, for dashboards and tools (docs/api.md, "Events").

Four kinds: ``submitted`` (a job was stored), ``started`` (an HTTP worker was granted
it), ``progress`` (a heartbeat stored progress) and ``finished`` (it reached a final
status). They come from what this process already hears after each commit, never from
polling: the runtime's observer calls (``submitted``, ``leased``, ``committed``: the
values are in hand) and the heartbeat path; finishes committed by other replicas come
through the same wake-ups the long-polls use (``Signals.jobs_finished``, fed by
PostgreSQL NOTIFY, Redis pub/sub or the AMQP fanout), read back by id in one query per
batch. Submits, starts and progress on other replicas are not carried (their brokers do
not announce them); nor are Redis-protocol workers' starts.

Costs nothing while nobody listens. Each connection holds at most ``BUFFER`` events:
when its client reads too slowly the oldest are dropped and the next event it gets is a
``dropped`` event with their count. A stream holds a long-poll slot (service/longpoll.py)
and ends after ``CELERIAC_EVENTS_MAX_SECONDS`` (EventSource clients reconnect)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service import errors
from service.db import Database
from service.effects import Effects
from service.models import JOBS_TABLE, JobValues
from service.observe import Observer
from service.serialize import iso
from service.signals import Signals
from service.states import FINISHED, JobStatus

log = logging.getLogger("celeriac.events")
jobs_c = JOBS_TABLE.c

KINDS = ("submitted", "started", "progress", "finished")
BUFFER = 1000  # events held per connection before the oldest are dropped
KEEPALIVE_SECONDS = 15.0  # a comment line this often keeps proxies from closing the stream
RECONNECT_MS = 1000  # the "retry:" an EventSource waits before it reconnects
_RECENT = 20_000  # finished jobs remembered, so a replica's own announcement is not repeated
_PENDING = 1000  # batches waiting behind a read-back, before the oldest are dropped


class TooManyStreams(errors.ServiceUnavailable):
    slug, title = "too-many-long-polls", "Too many long-polls or event streams are open"


@dataclass(frozen=True, slots=True)
class Event:
    kind: str
    queue: str
    data: dict[str, Any]


def _event(
    kind: str, job: JobValues | dict[str, Any], at: datetime | None, status: str | None = None
) -> Event:
    """One event's payload; ``status`` when the values in hand predate the change."""
    data: dict[str, Any] = {
        "event": kind,
        "id": job["id"],
        "queue": job["queue"],
        "task": job.get("task"),
        "status": str(status or job.get("status")),
        "attempt": job.get("attempt"),
        "at": iso(at or datetime.now(UTC)),
    }
    if kind == "progress":
        data["progress"] = job.get("progress")
    return Event(kind, job["queue"], data)


class Subscription:
    """One connection's bounded buffer of the events its filter selects."""

    def __init__(self, queues: frozenset[str] | None, allows: Callable[[str], bool]) -> None:
        self.queues = queues
        self.allows = allows
        self.buffer: deque[Event] = deque()
        self.dropped = 0
        self.ready = asyncio.Event()

    def offer(self, event: Event) -> None:
        if self.queues is not None and event.queue not in self.queues:
            return
        if not self.allows(event.queue):  # a key restricted to some queues sees only those
            return
        if len(self.buffer) >= BUFFER:
            self.buffer.popleft()
            self.dropped += 1
        self.buffer.append(event)
        self.ready.set()

    def take(self) -> list[str]:
        """The buffered events as SSE frames (a ``dropped`` frame first, if any were)."""
        frames = []
        if self.dropped:
            frames.append(_frame("dropped", {"event": "dropped", "dropped": self.dropped}))
            self.dropped = 0
        while self.buffer:
            event = self.buffer.popleft()
            frames.append(_frame(event.kind, event.data))
        self.ready.clear()
        return frames


def _frame(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class EventHub(Observer):
    """Fans the process's job changes out to the open streams. As an ``Observer`` it hears
    local commits with their values; through ``Signals`` it hears other replicas' finishes."""

    def __init__(self, db: Database, signals: Signals) -> None:
        self.db = db
        self.signals = signals
        self.subscriptions: set[Subscription] = set()
        self._recent: OrderedDict[str, None] = OrderedDict()  # finished ids already told
        # Events waiting behind a read-back, with their counts (for ``dropped``).
        self._queue: deque[tuple[list[Event] | ReadBack, int]] = deque()
        self._reader: asyncio.Task[None] | None = None
        self._busy = False

    # --- connections ---------------------------------------------------------------------

    def subscribe(self, subscription: Subscription) -> None:
        self.subscriptions.add(subscription)
        self.signals.on_finished = self._finished_elsewhere

    def unsubscribe(self, subscription: Subscription) -> None:
        self.subscriptions.discard(subscription)
        if not self.subscriptions:
            self.signals.on_finished = None
            self._recent.clear()

    def _emit(self, events: Iterable[Event]) -> None:
        """Events in hand: out at once, unless a read-back is in flight before them (they
        then wait behind it, so that every stream sees one job's events in order)."""
        ready = list(events)
        if self._busy or self._queue:
            self._enqueue(ready, len(ready))
        else:
            self._fan_out(ready)

    def _fan_out(self, events: list[Event]) -> None:
        for event in events:
            for subscription in self.subscriptions:
                subscription.offer(event)

    # --- what this process committed (Observer) ---------------------------------------------

    def submitted(self, rows: Sequence[JobValues]) -> None:
        if self.subscriptions:
            self._emit(_event("submitted", row, row["created_at"]) for row in rows)

    def leased(self, rows: Sequence[JobValues]) -> None:
        if self.subscriptions:
            for row in rows:  # a retried job runs again: its next finish is news
                self._recent.pop(row["id"], None)
            # A lease's values: what its worker receives (no status, no start time).
            self._emit(_event("started", row, None, JobStatus.running) for row in rows)

    def committed(self, effects: Effects) -> None:
        if not self.subscriptions:
            return
        for ended in effects.ended:
            if ended.status in FINISHED:
                self._remember(ended.id)
                job = {"id": ended.id, "queue": ended.queue, "task": ended.task,
                       "status": ended.status, "attempt": ended.attempt}  # fmt: skip
                self._emit([_event("finished", job, ended.ended_at)])

    def progressed(self, job_ids: Sequence[str]) -> None:
        """Heartbeats stored progress for these jobs (read back: a heartbeat has no queue)."""
        if self.subscriptions and job_ids:
            self._read_back("progress", list(job_ids))

    # --- what other replicas committed (Signals) -------------------------------------------

    def _finished_elsewhere(self, job_ids: list[str]) -> None:
        unknown = [job_id for job_id in job_ids if job_id not in self._recent]
        if unknown and self.subscriptions:
            self._read_back("finished", unknown)

    def _remember(self, job_id: str) -> None:
        self._recent[job_id] = None
        self._recent.move_to_end(job_id)
        while len(self._recent) > _RECENT:
            self._recent.popitem(last=False)

    def _read_back(self, kind: str, job_ids: list[str]) -> None:
        self._enqueue(ReadBack(kind, job_ids, datetime.now(UTC)), len(job_ids))
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._drain(), name="celeriac-events")

    def _enqueue(self, item: list[Event] | ReadBack, size: int) -> None:
        if len(self._queue) >= _PENDING:  # the database is slow to answer: lose the oldest
            _, lost = self._queue.popleft()
            for subscription in self.subscriptions:
                subscription.dropped += lost
        self._queue.append((item, size))

    async def _drain(self) -> None:
        """Everything queued, in order: a read-back is awaited, events behind it wait."""
        self._busy = True
        try:
            while self._queue:
                item, _size = self._queue.popleft()
                if isinstance(item, ReadBack):
                    item = await self._resolve(item)
                self._fan_out(item)
        finally:
            self._busy = False

    async def _resolve(self, asked: ReadBack) -> list[Event]:
        try:
            rows = await self.db.read(partial(_jobs_by_id, job_ids=asked.job_ids))
        except Exception as exc:  # an outage: these events are lost, the stream goes on
            log.debug("reading back %d job(s) for events failed: %r", len(asked.job_ids), exc)
            return []
        events = []
        for row in rows:
            if asked.kind == "progress":  # stored while it ran (the value may be newer)
                events.append(_event("progress", row, asked.at, JobStatus.running))
            elif row["status"] in FINISHED and row["id"] not in self._recent:
                self._remember(row["id"])  # (else retried since, or told already)
                events.append(_event("finished", row, row["finished_at"]))
        return events


@dataclass(frozen=True, slots=True)
class ReadBack:
    """Events known only by job id: read the jobs back, then tell them."""

    kind: str
    job_ids: list[str]
    at: datetime


def _jobs_by_id(session: Session, job_ids: list[str]) -> list[dict[str, Any]]:
    columns = ("id", "queue", "task", "status", "attempt", "progress", "finished_at")
    query = sa.select(*(jobs_c[name] for name in columns)).where(jobs_c.id.in_(job_ids))
    return [dict(row._mapping) for row in session.execute(query)]


class Observers(Observer):
    """Several observers as one (the runtime has one observer field): every method of
    ``Observer``, present and future, is called on each in turn."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers


def _fan_out(name: str) -> Callable[..., None]:
    def method(self: Observers, *args: Any, **kwargs: Any) -> None:
        for observer in self.observers:
            getattr(observer, name)(*args, **kwargs)

    method.__name__ = name
    return method


for _name, _value in vars(Observer).items():
    if callable(_value) and not _name.startswith("_"):
        setattr(Observers, _name, _fan_out(_name))


async def stream(
    hub: EventHub, subscription: Subscription, seconds: float, gone: Callable[[], Awaitable[None]]
) -> AsyncIterator[str]:
    """The SSE frames of one connection, for ``seconds`` at most or until ``gone()``
    returns (its client closed the connection: the stream ends at once, and so does its
    hold on a long-poll slot), or the service stops (the client reconnects elsewhere)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    departed = asyncio.ensure_future(gone())
    stopping = asyncio.ensure_future(hub.signals.stopping.wait())
    hub.subscribe(subscription)
    try:
        yield f"retry: {RECONNECT_MS}\n: subscribed\n\n"
        while (left := deadline - loop.time()) > 0:
            ready = asyncio.ensure_future(subscription.ready.wait())
            await asyncio.wait(
                {ready, departed, stopping},
                timeout=min(left, KEEPALIVE_SECONDS),
                return_when=asyncio.FIRST_COMPLETED,
            )
            ready.cancel()
            if departed.done():
                return
            frames = subscription.take()
            yield "".join(frames) if frames else ": keep-alive\n\n"
            if stopping.done():
                return
    finally:
        departed.cancel()
        stopping.cancel()
        hub.unsubscribe(subscription)
