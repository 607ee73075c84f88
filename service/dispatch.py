"""The one place that grants leases, for every broker.

A lease asks the broker for candidate ids (``service.brokers.base``), grants them in SQL
(``claim_by_ids``: SQL decides), acks what it granted and hands back the rest. The SQL
broker holds no index: its candidates are the jobs table itself, claimed and granted in
one statement (``claim_from_queues``: ``UPDATE … RETURNING`` over the ids a
``SELECT … FOR UPDATE SKIP LOCKED`` picked; two statements on MariaDB).

The same rules for every broker:

- Waiting: an index broker waits inside ``candidates`` (BZMPOP, an AMQP consumer); SQL
  waiters wait on ``Signals`` (local commits, NOTIFY, or the one shared poll of a
  database without notifications). Never a poll per waiter. A SQL long-poll whose queues
  a claim here found drained, with nothing made ready since, waits without claiming
  first (``_drained``).
- Top-up: when the wait is over and the broker's answer was short, the rest comes from
  SQL: a job committed a moment ago may not have reached the broker yet (``POST /jobs``
  answers before it publishes), and "what is ready now" is SQL's to say. Not for a broker
  whose workers lease from the index itself (``grants_outside_sql``).
- Outage: a broker that cannot be reached is replaced by SQL dispatch for that lease,
  and the long-poll is honoured (it waits for a signal, with the shared poll waking it
  for commits made elsewhere), rather than answering empty at once, over and over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from service.brokers.base import Broker, BrokerUnavailable, Candidates
from service.brokers.sql import SqlBroker
from service.db import Database
from service.leases import (
    LeaseTerms,
    claim_by_ids,
    claim_from_queues,
    claim_ids_direct,
    claim_queue_direct,
    short_means_drained,
)
from service.models import JobValues
from service.pg_direct import Direct, DirectPg, Refused
from service.signals import Signals

log = logging.getLogger("celeriac.dispatch")

Terms = Callable[[], LeaseTerms]
_DRAINED_KEYS = 1024  # distinct queue lists remembered (then forgotten all at once)
PLAIN_RETRY_SECONDS = 1.0
Spawn = Callable[[Coroutine[Any, Any, None], str], None]


class Dispatcher:
    def __init__(
        self, db: Database, signals: Signals, broker: Broker, *, fallback_seconds: float,
        spawn: Spawn, direct: DirectPg | None = None, loop_direct: Direct | None = None,
    ) -> None:  # fmt: skip
        self.db = db
        # On PostgreSQL, claims that are one statement run from the event loop; a queue's
        # claim also on SQLite (``loop_direct``).
        self.direct = direct
        self.loop_direct = loop_direct
        self.signals = signals
        self.broker = broker
        # The SQL candidate source: the broker itself, or the fallback of an index broker
        # (never started: it only wakes SQL waiters while that broker is down).
        self.sql = broker if isinstance(broker, SqlBroker) else SqlBroker(
            db, signals, fallback_seconds=fallback_seconds
        )  # fmt: skip
        self._spawn = spawn
        self._down = False
        # queues -> Signals.ready_generation when a claim of them here last came back short
        self._drained_at: dict[tuple[str, ...], int] = {}
        self._all_limited_at = -PLAIN_RETRY_SECONDS  # see ``_limited_lately``

    async def lease(
        self, queues: Sequence[str], max_jobs: int, wait: float, terms: Terms
    ) -> list[JobValues]:
        """Up to ``max_jobs`` jobs leased in SQL, waiting up to ``wait`` seconds for one.
        ``terms`` is called for each attempt, so a lease granted late in a long-poll still
        gets its full length."""
        deadline = asyncio.get_running_loop().time() + wait
        if self.broker.holds_index:
            rows = await self._from_index(queues, max_jobs, deadline, terms)
            if rows is not None:
                return rows
        return await self._from_sql(queues, max_jobs, deadline, terms)

    async def _from_index(
        self, queues: Sequence[str], max_jobs: int, deadline: float, terms: Terms
    ) -> list[JobValues] | None:
        """None: the broker is down (SQL serves this lease)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                batch = await self._candidates(queues, max_jobs, max(deadline - loop.time(), 0.0))
            except BrokerUnavailable as exc:
                if not self._down:
                    log.warning("%s broker unavailable (%s); dispatching from SQL meanwhile",
                                self.broker.name, exc)  # fmt: skip
                    self._down = True
                return None
            if self._down:
                log.warning("%s broker answers again; dispatching from it", self.broker.name)
                self._down = False
            # A batch of stale ids only (granted meanwhile elsewhere): look again.
            rows = await self.grant(batch, terms)
            if rows or loop.time() >= deadline or self.signals.draining:
                break
        short = len(rows) < max_jobs and loop.time() >= deadline  # and the wait is over
        if short and not self.broker.grants_outside_sql:
            rows = await self._top_up(rows, queues, max_jobs, terms)
        return rows

    async def _candidates(self, queues: Sequence[str], max_jobs: int, wait: float) -> Candidates:
        """The broker's candidates; a blocking wait (in Redis, RabbitMQ) is cut short when
        the service starts to stop (``Signals.drain``). An id popped just as it is cut
        is not lost: the reconciler offers a job that stays queued again."""
        if wait <= 0 or self.signals.draining:
            return await self.broker.candidates(queues, max_jobs, 0.0)
        asking = asyncio.ensure_future(self.broker.candidates(queues, max_jobs, wait))
        stopping = asyncio.ensure_future(self.signals.stopping.wait())
        try:
            await asyncio.wait({asking, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not asking.done():
                asking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            return await asking
        return Candidates()

    async def grant(self, batch: Candidates, terms: Terms) -> list[JobValues]:
        """Grant a batch in SQL; ack what was granted, hand back the rest."""
        if not batch.ids:
            return []
        try:
            rows = await self._claim_ids(batch.ids, terms)
        except BaseException:
            await batch.hand_back(batch.ids, still_ready=True)
            raise
        granted = {row["id"] for row in rows}
        if granted and batch.ack_may_wait and not self._flow_active():
            self._spawn(batch.ack(granted), "celeriac-index-ack")  # after the answer
        else:
            await batch.ack(granted)
        await batch.hand_back([i for i in batch.ids if i not in granted], still_ready=False)
        return rows

    async def _claim(self, queues: Sequence[str], max_jobs: int, terms: Terms) -> list[JobValues]:
        """One SQL claim; remembers whether it drained ``queues`` (see ``_drained``)."""
        generation = self.signals.ready_generation  # before the claim's snapshot
        plain = short_means_drained(self.db.engine)
        # terms() per attempt: a lease granted late still gets its full length.
        rows = await self._claim_queues(queues, max_jobs, terms)
        key = tuple(queues)
        if len(rows) < max_jobs and plain and short_means_drained(self.db.engine):
            if len(self._drained_at) >= _DRAINED_KEYS:
                self._drained_at.clear()
            self._drained_at[key] = generation
        else:
            self._drained_at.pop(key, None)
        return rows

    async def _claim_ids(self, ids: Sequence[str], terms: Terms) -> list[JobValues]:
        """``claim_by_ids``: one statement from the event loop where it can be. Under flow
        control that statement grants the jobs naming no limits outside queues with
        limits of their own (as flow control would), and the pool's path the rest."""
        from service import flow  # flow control's module imports the runtime, which imports this

        if self.direct is None:
            return await self.db.run(lambda s: claim_by_ids(s, ids, terms()), rows=len(ids))
        rest: Sequence[str] = ids
        granted: list[JobValues] = []
        with contextlib.suppress(Refused):  # nothing committed: the pool's path
            if not flow.active(self.db.engine):
                return await claim_ids_direct(self.direct, ids, terms())
            limited = flow.limited_queues(self.db.engine)
            if limited is not None and not self._limited_lately():
                granted = await claim_ids_direct(self.direct, ids, terms(), limited)
                if not granted:  # a batch of limited jobs: the next ones likely are too
                    self._all_limited_at = time.monotonic()
                taken = {row["id"] for row in granted}
                rest = [job_id for job_id in ids if job_id not in taken]
            if rest:
                granted += await self._flow_claim_direct(self.direct, rest, terms)
                rest = []
        if rest:
            granted += await self.db.run(lambda s: claim_by_ids(s, rest, terms()), rows=len(rest))
        # The broker's order; last, what flow control took from SQL for blocked ids.
        order = {job_id: index for index, job_id in enumerate(ids)}
        return sorted(granted, key=lambda row: order.get(row["id"], len(ids)))

    def _limited_lately(self) -> bool:
        """Whether a batch of candidates lately had no job that the plain statement
        grants under flow control (one naming no limits, outside queues with limits of
        their own): then flow control's claim takes the next batches whole, jobs without
        limits too, and spares the plain statement's round trip, until the plain statement
        is tried again ``PLAIN_RETRY_SECONDS`` later."""
        return time.monotonic() - self._all_limited_at < PLAIN_RETRY_SECONDS

    async def _flow_claim_direct(
        self, direct: DirectPg, ids: Sequence[str], terms: Terms
    ) -> list[JobValues]:
        """Flow control's claim of these ids on the direct path (service/flow_direct.py);
        for as many as it left blocked, the queues' other jobs through the pool, as
        ``flow.claim_by_ids`` takes them."""
        from service import flow, flow_direct

        first = terms()
        link = getattr(self.broker, "calls", None)  # the Redis broker's pipelined connection
        arbiter = first.slot_arbiter
        slots = (arbiter, link) if arbiter is not None and link is not None else None
        claimed = await flow_direct.claim_by_ids(direct, self.db.engine, ids, first, slots)
        blocked = claimed.blocked
        if not blocked:
            return claimed.granted
        return claimed.granted + await self.db.run(
            lambda s: flow.instead_of_blocked(s, blocked, terms()), rows=len(blocked)
        )

    async def _claim_queues(
        self, queues: Sequence[str], max_jobs: int, terms: Terms
    ) -> list[JobValues]:
        """``claim_from_queues``: for one queue, its one statement from the event loop
        where it can be. (Several queues: one transaction through the pool.)"""
        direct = self.loop_direct
        plain = len(queues) == 1 and not self._flow_active()  # (flow control's: several)
        if direct is not None and plain and direct.takes(max_jobs):
            with contextlib.suppress(Refused):
                return await claim_queue_direct(direct, queues[0], max_jobs, terms())
        return await self.db.run(
            lambda s: claim_from_queues(s, queues, max_jobs, terms()),
            rows=max_jobs,
        )

    def _flow_active(self) -> bool:
        from service import flow  # flow control's module imports the runtime, which imports this

        return flow.active(self.db.engine)

    def _drained(self, queues: Sequence[str]) -> bool:
        """Whether the last claim of ``queues`` here came back short and nothing became
        ready since (no local commit, NOTIFY or reconnect moved ``ready_generation``).
        A prefetching worker asks again right after each lease: this spares that claim,
        which would find nothing, a transaction. Only while every commit is heard (a
        connected LISTEN), and not under flow control (``short_means_drained``); even
        then the long-poll still claims when its wait ends, so a job made ready without
        a signal (a claimer that locked it, then rolled back) waits at most one poll, as
        it would for a worker already parked."""
        if not self.sql.hears_every_commit():
            return False
        return self._drained_at.get(tuple(queues)) == self.signals.ready_generation

    async def _top_up(
        self, rows: list[JobValues], queues: Sequence[str], max_jobs: int, terms: Terms
    ) -> list[JobValues]:
        want = max_jobs - len(rows)
        extra = await self._claim_queues(queues, want, terms)
        if not extra:
            return rows
        order = {queue: index for index, queue in enumerate(queues)}
        return sorted(rows + extra, key=lambda r: (order[r["queue"]], -r["priority"], r["id"]))

    async def _from_sql(
        self, queues: Sequence[str], max_jobs: int, deadline: float, terms: Terms
    ) -> list[JobValues]:
        loop = asyncio.get_running_loop()
        if deadline > loop.time():
            self.sql.ensure_wakeups(self._spawn)
        first = True
        while True:
            # Registered before the claim: a wake-up between claim and wait is not lost.
            event = self.signals.ready_waiter(queues)
            try:
                if first and deadline > loop.time() and self._drained(queues):
                    rows = []  # nothing can have become ready: wait for that straight away
                else:
                    rows = await self._claim(queues, max_jobs, terms)
                first = False
                remaining = deadline - loop.time()
                if rows or remaining <= 0 or self.signals.draining:
                    return rows
                # Woken by a local commit, NOTIFY, or the shared poll: never a timer here.
                # (``asyncio.timeout``, not ``wait_for``: no task of its own, so a wake-up
                # resumes this request in the loop's next turn, not two turns later.)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await event.wait()
            finally:
                self.signals.drop_ready_waiter(queues, event)
