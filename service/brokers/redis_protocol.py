"""The service's side of the Redis worker protocol (docs/protocol.md, "Redis protocol").

Workers that speak Redis lease, heartbeat and settle jobs with the functions in
``service/lua/celeriac.lua``; each call appends an event to ``{tag}:events``. This module
keeps that working: it writes job envelopes next to the ready sets, and it applies the
event stream to SQL in batches (one transaction per batch, through the same domain
functions as the HTTP protocol, so SQL fences a stale report a second time). Events are
read with a consumer group and acknowledged only after their transaction commits, so a
crash replays them; applying an event twice is harmless (a second grant finds the job no
longer queued, a second report finds the lease already settled)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from functools import partial
from itertools import groupby
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import orjson
import sqlalchemy as sa
from redis.exceptions import RedisError, ResponseError
from sqlalchemy.orm import Session

from service import errors, leases
from service.brokers import redis_events
from service.brokers.redis_events import REPORTS, Event, Kind
from service.effects import Effects
from service.isolation import is_row_error, reason
from service.leases import Grant, LeaseTerms, Settle, jobs_c
from service.pg_direct import Refused
from service.states import JobStatus, LeaseProblem, Outcome

if TYPE_CHECKING:
    from service.brokers.base import BrokerHooks
    from service.brokers.redis import RedisBroker
    from service.pg_direct import DirectPg

log = logging.getLogger("celeriac.redis.protocol")

GROUP = "celeriac-service"
EVENT_BATCH = 2000
CLAIM_IDLE_MS = 15_000
# A report whose job SQL still has queued came before its lease event, which another
# replica read and has not applied yet (the consumer group shares the stream, so one
# job's events may go to two replicas). It stays unacknowledged here and is applied
# again every EARLY_RETRY_MS until the lease lands, for at most EARLY_SECONDS: then it
# is applied as it is (refused as stale, and dropped). Under CLAIM_IDLE_MS, so that this
# replica never takes over its own held reports as abandoned.
EARLY_RETRY_MS = 50
EARLY_SECONDS = 10.0
# At most this many held at once (a batch's worth): anyone who can write to the stream
# could send reports for queued jobs, and each held one is applied again every 50 ms.
EARLY_LIMIT = EVENT_BATCH

# A batch that leases jobs without reporting them waits this long for more events before
# it is applied: an idle worker's report of a short job follows its lease event by a
# fraction of a millisecond, and read together the two commit once, not twice (on
# PostgreSQL, ``_apply_direct``), which takes a commit off every such round trip. Only the
# lease's mirror in SQL waits (for a longer job); no report or heartbeat is held back, as
# the read returns at the first event that comes.
LINGER_MS = 2

Entry = tuple[str, dict[str, str]]  # a stream entry: its id, its fields


def _fields(raw: list[str] | dict[str, str] | None) -> dict[str, str]:
    """An entry's fields as a dict: from the flat list Redis sends (redis-py, the fallback
    for URLs the link does not speak, has made the dict already); a deleted entry's are
    none."""
    if isinstance(raw, dict):
        return raw
    return dict(zip(raw[::2], raw[1::2], strict=False)) if raw else {}


class EarlyReports:
    """Reports read before their lease reached SQL (see EARLY_SECONDS), held
    unacknowledged to be applied again with the next batch."""

    def __init__(self, limit: int = EARLY_LIMIT) -> None:
        self.limit = limit
        self._held: dict[str, tuple[dict[str, str], float]] = {}  # entry id -> fields, since

    def __bool__(self) -> bool:
        return bool(self._held)

    def take(self) -> list[Entry]:
        """The held entries, to go before the new ones (``hold`` sorts them again)."""
        return [(entry_id, fields) for entry_id, (fields, _since) in self._held.items()]

    def hold(self, entries: list[Entry], early: set[str], now: float) -> set[str]:
        """Of a batch's ``entries`` just applied, the reports of the jobs in ``early``
        (refused while SQL still had the job queued) to keep: unless held EARLY_SECONDS
        already, or ``limit`` are held. Returns their job ids; any other entry of the
        batch, held before or not, leaves."""
        jobs: set[str] = set()
        for entry_id, fields in entries:
            first = self._held.pop(entry_id, None)
            job_id = fields.get("id")
            if fields.get("k") not in REPORTS or job_id not in early:
                continue
            since = now if first is None else first[1]
            if now - since < EARLY_SECONDS and len(self._held) < self.limit:
                self._held[entry_id] = (fields, since)
                jobs.add(job_id)
            else:
                log.warning("Redis worker report for job %s dropped: its lease did not reach"
                            " SQL in %.0fs", job_id, now - since)  # fmt: skip
        return jobs

    def holds(self, entry_id: str) -> bool:
        return entry_id in self._held


def load_envelopes(session: Session, ids: Sequence[str]) -> dict[str, str]:
    columns = (*leases.CLAIM_COLUMNS, "limits")  # limits: for the Lua lease's flow control
    query = sa.select(*(jobs_c[c] for c in columns)).where(
        jobs_c.id.in_(ids), jobs_c.status == JobStatus.queued
    )
    return {row.id: envelope(dict(row._mapping)) for row in session.execute(query)}


def envelope(values: Mapping[str, Any]) -> str:
    """The job as a Redis worker receives it: like an HTTP lease without the lease, which
    the lease function splices in. ``attempt`` is the attempt this run will be."""
    body = {name: values[name] for name in leases.CLAIM_COLUMNS if name != "parents"}
    if values.get("parents") is not None:  # a workflow job (service/workflows.py)
        body.update(values["parents"])
    body["attempt"] = values["attempt"] + 1
    if values.get("limits"):  # the keys the Lua lease counts it against (flow control)
        body["limits"] = values["limits"]
    try:
        return orjson.dumps(body).decode()
    except TypeError:  # orjson.JSONEncodeError too: integers beyond 64 bits
        return json.dumps(body, separators=(",", ":"))


class EventIngest:
    """Applies ``{tag}:events`` to SQL. Every replica runs one; the consumer group shares
    the stream between them."""

    def __init__(self, broker: RedisBroker, hooks: BrokerHooks) -> None:
        self.db = broker.db
        self.redis = broker.redis
        self.layout = broker.layout
        self.stream = broker.layout.events
        self.now = hooks.now
        self.after_commit = hooks.apply
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"
        self.broker = broker
        self.waited = broker.signals.is_waited
        self.direct = hooks.direct
        self.flow_active = hooks.flow_active
        self.early = EarlyReports()

    async def run(self) -> None:
        # Not ``while True``: a cancel that redis-py turns into a RedisError while a read
        # is in flight would be retried below and never end the loop.
        while not self.broker.closing:
            try:
                await self._ensure_group()
                await self._drain_abandoned()
                while not self.broker.closing:
                    entries = await self._read(EVENT_BATCH, EARLY_RETRY_MS if self.early else 5000)
                    if _leases_unreported(entries) and len(entries) < EVENT_BATCH:
                        entries += await self._read(EVENT_BATCH - len(entries), LINGER_MS)
                    if entries or self.early:
                        await self._apply(self.early.take() + entries)
                    else:
                        await self._drain_abandoned()
            except errors.DatabaseUnavailable:
                # Logged once by service/outage.py; the batch stays unacknowledged and is
                # claimed again (_drain_abandoned) once SQL answers.
                await asyncio.sleep(1.0)
            except RedisError as exc:
                log.warning("Redis event stream unavailable (%s); retrying", exc)
                await asyncio.sleep(1.0)
            except Exception:
                # Never let the consumer die: its events would wait for a restart.
                log.exception("applying Redis worker events failed; retrying in 5s")
                await asyncio.sleep(5.0)

    async def _read(self, count: int, block_ms: int) -> list[Entry]:
        """The next entries for this consumer: at most ``count``, once there is one or
        ``block_ms`` passed (then none)."""
        answer = await self.broker.calls.blocking(
            "XREADGROUP", "GROUP", GROUP, self.consumer, "COUNT", count, "BLOCK", block_ms,
            "STREAMS", self.stream, ">",
        )  # fmt: skip
        # RESP2: [[stream, [[entry id, [field, value, ...]], ...]]]
        return [(entry_id, _fields(raw)) for entry_id, raw in answer[0][1]] if answer else []

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _drain_abandoned(self) -> None:
        """Take over events a crashed replica read but never acknowledged."""
        start = "0-0"
        while True:
            answer = await self.redis.xautoclaim(
                self.stream, GROUP, self.consumer, CLAIM_IDLE_MS, start_id=start, count=500
            )
            start, entries = answer[0], answer[1]
            if entries:
                await self._apply(entries)
            if start in ("0-0", b"0-0"):
                return

    async def _apply(self, entries: list[Entry]) -> None:
        events = redis_events.decode_all(entries)  # malformed ones dropped, logged once
        effects, early = await self._apply_events(events, self.now())
        # Waiters and dispatch first: they wait on this commit, the tombstones do not.
        await self.after_commit(effects)
        held = self.early.hold(entries, early, asyncio.get_running_loop().time())
        reported = [
            self.layout.job(e["id"]) for e in events if e["k"] in REPORTS and e["id"] not in held
        ]
        if reported:  # SQL has the reports now (or refused them): the tombstones may go
            await self.broker.lua.run(self.broker.calls, "forget", keys=reported)
        ids = [entry_id for entry_id, _ in entries if not self.early.holds(entry_id)]
        if ids:
            calls = self.broker.calls
            await calls.many(("XACK", self.stream, GROUP, *ids), ("XDEL", self.stream, *ids))

    async def _apply_events(self, events: list[Event], now: datetime) -> tuple[Effects, set[str]]:
        """The batch: what the direct path takes (``_apply_direct``), then the rest in one
        transaction; if the database refuses a row of it, each event in a transaction of
        its own (stream order), dropping the ones it still refuses. An outage propagates:
        the batch stays unacknowledged and is read again (what already committed is
        applied again harmlessly). Also returns the jobs whose report came before their
        lease (``apply_events``)."""
        effects, early = Effects(), set[str]()
        if self.direct is not None:
            events = await self._apply_direct(self.direct, events, now, effects)
        if not events:
            return effects, early
        try:
            one = partial(_applied, events=events, now=now, waited=self.waited)
            applied, early = await self.db.run(one)
            effects.merge(applied)
            return effects, early
        except Exception as exc:
            if not is_row_error(exc):
                raise
        for event in events:
            try:
                one = partial(_applied, events=[event], now=now, waited=self.waited)
                applied, too_early = await self.db.run(one)
                effects.merge(applied)
                early |= too_early
            except Exception as exc:
                if not is_row_error(exc):
                    raise
                log.warning("Redis worker event %s for job %s dropped: the database refused it"
                            " (%s)", event["k"], event["id"], reason(exc))  # fmt: skip
        return effects, early

    async def _apply_direct(
        self, direct: DirectPg, events: list[Event], now: datetime, effects: Effects
    ) -> list[Event]:
        """On PostgreSQL without flow control, from the event loop (service/pg_direct.py):
        the batch's leases and its successes without logs (``settle_succeeded_direct``,
        which leaves a stale token, a webhook or a workflow to ``settle``) in one
        transaction, the leases' statement first: one commit, where a lease and its report
        read together (an idle worker's round trip, a drain) took two. The events left
        for the pooled transaction: heartbeats, failures, releases and the successes the
        statement left. A job's lease is granted before its report is applied, as in the
        pooled path; a report applied here before an earlier heartbeat of its job makes
        that heartbeat find the job ended, as it would have in the next batch."""
        if await self.flow_active():  # a mirrored grant writes limit slots too
            return events
        leased = [e for e in events if e["k"] == Kind.lease]
        rows = [_mirrored(e, now) for e in leased]
        grants = [leases.grant_mirrored_step(direct, rows)] if rows else []
        rest = [e for e in events if e["k"] != Kind.lease]
        reported = [e["id"] for e in rest if e["k"] in REPORTS]
        successes = [_report(e["k"], e) for e in rest if e["k"] == Kind.complete]
        candidates = [report for report in successes if leases.settles_directly(report)]
        settled: Mapping[str, Any] = {}
        try:
            if candidates and len(set(reported)) == len(reported):
                settled = await leases.settle_succeeded_direct(
                    direct, candidates, now, effects, key_id="", waited=self.waited, first=grants
                )
            elif grants:  # (a job reported twice: which report wins is ``settle``'s call)
                await direct.fetch(*grants[0])
        except Refused:  # nothing committed, the leases neither: all of it through the pool
            return events
        effects.leases_recorded += len(leased)
        return [e for e in rest if e["k"] != Kind.complete or e["id"] not in settled]


def _mirrored(event: Event, now: datetime) -> dict[str, Any]:
    deadline = now + timedelta(milliseconds=int(event["ms"]))
    return leases.mirrored(event["id"], leases.Lease(event["t"], event["w"], "", deadline, now))


def _applied(
    session: Session, events: list[Event], now: datetime, waited: Callable[[str], bool]
) -> tuple[Effects, set[str]]:
    effects = Effects()  # fresh for each try: a retried transaction starts over
    early = apply_events(session, events, now, effects)
    leases.keep_settled(session, effects, waited)  # ``?wait=`` here answers without a read
    return effects, early


def apply_events(
    session: Session, events: list[Event], now: datetime, effects: Effects
) -> set[str]:
    """Apply a batch: every lease first, then heartbeats, then reports, each as one
    batch. Per job this keeps stream order within a replica, because a job's lease event
    always precedes its heartbeats and report, and it can only be leased again after SQL
    applied that report (or reclaimed the lease, which a later stale report cannot
    undo). Between replicas it does not: the lease may be in another's batch. Returns
    the jobs whose report was refused while SQL still has them queued: reports that
    came before their lease, for the caller to apply again (EARLY_SECONDS)."""
    leased = [e for e in events if e["k"] == Kind.lease]
    beats = [e for e in events if e["k"] == Kind.heartbeat]
    reports = [_report(e["k"], e) for e in events if e["k"] in REPORTS]
    # A job leased and settled within this batch is written once, by settle().
    settled = {(r.id, r.token) for r in reports}
    grants = {e["id"]: Grant(e["t"], e["w"], now) for e in leased if (e["id"], e["t"]) in settled}
    _grant(session, [e for e in leased if e["id"] not in grants], now)
    effects.leases_recorded += len(leased)  # metrics (may count a re-applied event twice)
    _extend(session, beats, now)
    if not reports:
        return set()
    outcomes = leases.settle(session, reports, now, effects, grants)
    refused = [outcome.id for outcome in outcomes if outcome.problem is LeaseProblem.stale]
    if not refused:
        return set()
    still_queued = leases.filter_only(jobs_c.status == JobStatus.queued)
    queued = sa.select(jobs_c.id).where(jobs_c.id.in_(refused), still_queued)
    return set(session.scalars(queued))


def _grant(session: Session, events: list[Event], now: datetime) -> None:
    """Mirror Redis leases into SQL. A job that SQL no longer has queued (cancelled,
    expired) is not granted: its worker's report will be refused as stale."""
    from service.flow import record_mirrored  # flow imports the runtime, which imports us

    for (token, worker, lease_ms), run in groupby(events, key=itemgetter("t", "w", "ms")):
        # No API keys on the Redis protocol: only it (or auth off) may settle.
        lease = leases.Lease(token, worker, "", now + timedelta(milliseconds=int(lease_ms)), now)
        ids = [e["id"] for e in run]
        leases.grant(session, ids, lease)
        record_mirrored(session, ids, token, now)  # HTTP grants count these too


def _extend(session: Session, events: list[Event], now: datetime) -> None:
    for lease_ms, run in groupby(sorted(events, key=itemgetter("ms")), key=itemgetter("ms")):
        terms = LeaseTerms("", "", now, lease_ms / 1000, 0.0)
        leases.heartbeat(session, [(e["id"], e["t"], e["p"]) for e in run], terms)


def _report(kind: str, event: Event) -> Settle:
    """Events come decoded and checked (``redis_events.decode``)."""
    if kind == Kind.complete:
        return Settle(
            event["id"], event["t"], Outcome.succeeded, result=event["r"], logs=event.get("l")
        )
    if kind == Kind.release:
        return Settle(event["id"], event["t"], Outcome.released)
    return Settle(
        event["id"],
        event["t"],
        Outcome.failed,
        error=event["e"],
        retry=event["retry"],
        retry_in=event["retry_in"],
        logs=event.get("l"),
    )


def _leases_unreported(entries: list[Entry]) -> bool:
    """Whether the batch leases a job it does not also report."""
    leased = {fields.get("id") for _, fields in entries if fields.get("k") == Kind.lease}
    if not leased:
        return False
    return not leased <= {fields.get("id") for _, fields in entries if fields.get("k") in REPORTS}
