"""Flow control when HTTP and Redis-protocol workers lease jobs of the same limit keys
(docs/flow-control.md, "HTTP and Redis workers on one key").

The Lua lease counts slots in Redis, atomically; an HTTP lease is granted in SQL. So that
a key's ``max_running`` and rate hold for both together, Redis arbitrates every slot: an
HTTP claim that admitted jobs with limited keys asks Redis (``celeriac_v1_http_grant``)
inside its SQL transaction, before the grant, and grants only what Redis gave a slot.
The job's hash then holds the HTTP lease's token, which the Lua lease counts as a slot
(and skips as a job) until the lease ends in SQL: ``free_ended`` after the commit of a
settle or reclaim (or the re-publish of a requeued job) removes it. A claim whose
transaction does not commit gives its slots back (``http_undo``); ``repair`` frees the
slots of HTTP leases that SQL ended but whose freeing was lost (a Redis error, a crash).

Only when the service serves the Redis worker protocol (``RedisBroker`` with
``serve_workers``), and only for admitted jobs that name limited keys: the plain claim
and jobs without limits make no Redis call here."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import redis
import sqlalchemy as sa
from redis.exceptions import RedisError
from sqlalchemy.orm import Session, SessionTransaction

from service.effects import Effects
from service.models import JobValues

if TYPE_CHECKING:
    from service.brokers.base import Broker
    from service.brokers.redis import RedisBroker, RedisLayout
    from service.brokers.redis_link import RedisLink
    from service.db import Database
    from service.flow import Admission
    from service.leases import LeaseTerms

log = logging.getLogger("celeriac.flow.redis")

PROTOCOL = "1"
# A freed slot's job hash stays a tombstone this long (as after an HTTP lease's ack), so
# that a reconcile pass that read SQL a moment earlier does not offer the job again.
TOMBSTONE_SECONDS = 30
# Why Redis refused a job that is not a key without room (celeriac.lua, http_grant).
HELD, UNSYNCED = "!", "?"
# An HTTP lease's slot younger than this is never repaired: its SQL transaction may not
# have committed yet (a claim holds its transaction for milliseconds; this is generous).
REPAIR_GRACE_MS = 60_000
# Leases the repair pass looks at per run (each run takes the oldest).
REPAIR_BATCH = 1000


def _job_keys(row: JobValues) -> str:
    """What the Lua functions need of a job to find its keys: its queue and limits."""
    return json.dumps({"queue": row["queue"], "limits": list(row.get("limits") or ())})


def _slot_args(rows: Sequence[JobValues], token: str) -> list[Any]:
    """The arguments of ``http_grant`` and ``http_undo``: the token, then each job."""
    args: list[Any] = [PROTOCOL, token]
    for row in rows:
        args += [row["id"], _job_keys(row)]
    return args


class SlotArbiter:
    """Redis's side of an HTTP grant, called from the claim's database thread: a
    synchronous client of its own (redis-py's pool is thread-safe)."""

    def __init__(self, url: str, layout: RedisLayout) -> None:
        # Bounded: the claim holds its SQL locks while it waits for this answer.
        self.client = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=2.0, socket_connect_timeout=2.0
        )
        self.flow_key = f"{layout.tag}:flow"
        self._failing = False  # logged once per outage

    def take(self, session: Session, rows: Sequence[JobValues], token: str) -> list[str]:
        """Per row: '' when Redis gave it its slots under ``token``, else why not. The
        slots are given back if ``session``'s transaction ends without a commit. With
        Redis unreachable nothing is granted: a slot Redis does not know of would let
        Redis workers exceed the limit once it answers again."""
        try:
            answers: list[str] = self.client.fcall(
                "celeriac_v1_http_grant", 1, self.flow_key, *_slot_args(rows, token)
            )
        except RedisError as exc:
            return self._unanswered(exc, rows)
        self._failing = False
        taken = [row for row, answer in zip(rows, answers, strict=True) if answer == ""]
        if taken:
            _unless_committed(session, lambda: self.undo(taken, token))
        return answers

    async def take_from_loop(
        self, link: RedisLink, rows: Sequence[JobValues], token: str
    ) -> list[str]:
        """``take`` from the event loop, through the broker's own connection (flow
        control's claim on the direct path, service/flow_direct.py), whose caller gives
        the slots back (``undo_from_loop``) if its transaction does not commit."""
        try:
            answers: list[str] = await link.call(
                "FCALL", "celeriac_v1_http_grant", 1, self.flow_key, *_slot_args(rows, token)
            )
        except RedisError as exc:
            return self._unanswered(exc, rows)
        self._failing = False
        return answers

    def _unanswered(self, exc: RedisError, rows: Sequence[JobValues]) -> list[str]:
        if not self._failing:
            log.warning("Redis does not answer (%s): jobs with limits wait for it", exc)
        self._failing = True
        return [HELD] * len(rows)

    def undo(self, rows: Sequence[JobValues], token: str) -> None:
        try:
            self.client.fcall("celeriac_v1_http_undo", 1, self.flow_key, *_slot_args(rows, token))
        except RedisError as exc:  # held until ``repair`` finds SQL never granted them
            log.warning("giving back the slots of an uncommitted HTTP lease failed: %s", exc)

    async def undo_from_loop(self, link: RedisLink, rows: Sequence[JobValues], token: str) -> None:
        try:
            await link.call(
                "FCALL", "celeriac_v1_http_undo", 1, self.flow_key, *_slot_args(rows, token)
            )
        except RedisError as exc:  # held until ``repair`` finds SQL never granted them
            log.warning("giving back the slots of an uncommitted HTTP lease failed: %s", exc)

    def close(self) -> None:
        self.client.close()


def _unless_committed(session: Session, undo: Callable[[], None]) -> None:
    """Run ``undo`` when the session's outermost transaction ends without a commit (an
    error in the claim, a failed or retried commit)."""
    state = {"committed": False, "done": False}

    def committed(_session: Session) -> None:
        state["committed"] = True

    def ended(_session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is not None or state["done"]:
            return
        state["done"] = True
        if not state["committed"]:
            undo()

    sa.event.listen(session, "after_commit", committed)
    sa.event.listen(session, "after_transaction_end", ended)


def arbiter(broker: Broker) -> SlotArbiter | None:
    """The broker's arbiter: a Redis broker serving the worker protocol has one."""
    found = getattr(broker, "slot_arbiter", None)
    return found if isinstance(found, SlotArbiter) else None


def arbitrate(session: Session, admission: Admission, terms: LeaseTerms) -> Admission:
    """Inside a claim, between admission and grant: Redis takes the slots of the admitted
    jobs that name limited keys, in order; a job it refuses stays queued (blocked), and
    the key it found full is full for the claim's next look too."""
    slots = terms.slot_arbiter
    limited = needing_slots(admission) if slots is not None else []
    if slots is None or not limited:
        return admission
    return with_answers(admission, limited, slots.take(session, limited, terms.token))


def needing_slots(admission: Admission) -> list[JobValues]:
    """The admitted jobs that name limited keys: those Redis gives slots to."""
    from service.flow import keys_of

    if not admission.rules:
        return []
    rules = admission.rules
    return [row for row in admission.admitted if any(key in rules for key in keys_of(row))]


def with_answers(
    admission: Admission, limited: Sequence[JobValues], answers: list[str]
) -> Admission:
    """``admission`` after Redis's answers for ``limited``: a job it refused stays queued
    (blocked), and the key it found full is full for the claim's next look too."""
    refused = {row["id"]: answer for row, answer in zip(limited, answers, strict=True) if answer}
    if refused:
        admission.blocked += [row for row in admission.admitted if row["id"] in refused]
        admission.admitted = [row for row in admission.admitted if row["id"] not in refused]
        admission.full |= {key for key in refused.values() if key in admission.rules}
    return admission


async def free_ended(broker: RedisBroker, effects: Effects) -> None:
    """After the commit that ended leases (settled, reclaimed): the slots their job
    hashes still hold under those tokens free now, and a worker of the queue wakes. Only
    while flow control is configured (a slot is held only then)."""
    from service.flow import active, state_of

    if not active(broker.db.engine):
        return
    # Only a lease whose job named limits, or whose queue has its own, can hold a slot.
    snap = state_of(broker.db.engine).snapshot
    ended = [
        (e.id, e.token, e.queue)
        for e in effects.ended
        if e.token and (e.limited or snap is None or e.queue in snap.queues)
    ]
    if not ended:
        return
    args: list[Any] = [PROTOCOL, TOMBSTONE_SECONDS]
    for job_id, token, queue in ended:
        args += [job_id, token, queue]
    try:
        await broker.calls.call("FCALL", "celeriac_v1_http_free", 1, _flow_key(broker), *args)
    except RedisError as exc:  # held until ``repair``
        log.warning("freeing the limit slots of ended leases failed: %s", exc)


async def leased(broker: RedisBroker, job_ids: Sequence[str]) -> None:
    """Jobs just leased over HTTP: their envelopes go (``RedisBroker.drop_envelopes``);
    a hash that holds its HTTP lease's slots keeps its token."""
    args: list[Any] = [PROTOCOL, TOMBSTONE_SECONDS, *job_ids]
    await broker.calls.call("FCALL", "celeriac_v1_http_leased", 1, _flow_key(broker), *args)


def _flow_key(broker: RedisBroker) -> str:
    return f"{broker.layout.tag}:flow"


async def repair(broker: RedisBroker, db: Database) -> int:
    """Free the slots of HTTP leases that SQL has ended but whose job hash may still hold
    them (their ``free_ended`` was lost: a Redis error, a crash). Run with the
    reconciler, over the leases granted more than ``REPAIR_GRACE_MS`` ago (younger ones
    may not have committed yet); returns how many slots it freed."""
    from service.results import live_leases

    client, registry = broker.redis, f"{broker.layout.tag}:http-slots"
    now_s, now_us = await client.time()
    horizon = now_s * 1000 + now_us // 1000 - REPAIR_GRACE_MS
    members = cast(
        list[str], await client.zrangebyscore(registry, "-inf", horizon, start=0, num=REPAIR_BATCH)
    )
    held = {}
    for member in members:  # "<id>|<token>|<queue>"
        job_id, token, queue = member.split("|", 2)
        held[(job_id, token)] = queue
    if not held:
        return 0
    live = await db.read(lambda session: live_leases(session, list(held)))
    if live:  # looked at again a grace from now, after the others
        later = {f"{i}|{t}|{held[(i, t)]}": horizon + REPAIR_GRACE_MS for i, t in live}
        await client.zadd(registry, cast(dict[Any, Any], later), xx=True)
    args: list[Any] = [PROTOCOL, TOMBSTONE_SECONDS]
    for (job_id, token), queue in held.items():
        if (job_id, token) not in live:
            args += [job_id, token, queue]
    if len(args) == 2:
        return 0
    freed = int(await client.fcall("celeriac_v1_http_free", 1, _flow_key(broker), *args))
    if freed:
        log.warning("freed the limit slots of %d HTTP leases that had ended", freed)
    return freed
