"""What a transaction leaves to do after its commit, and what a broker is given to index.

Its own module so that the domain modules (``jobs``, ``leases``) and the brokers all
depend on it and never on each other for these two records."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from service.models import JobValues


@dataclass(frozen=True, slots=True)
class Dispatch:
    """A job that became ready: what a broker needs to index it."""

    id: str
    queue: str
    priority: int
    # The job's stored values, when the publisher has them in hand (a submit): a broker
    # that ships whole jobs (the Redis worker protocol's envelopes) need not read them
    # back. None: it reads what it needs from SQL.
    values: Mapping[str, Any] | None = field(default=None, compare=False)
    # Offered again, not made ready: a job its broker's index dropped when a claim handed
    # it back blocked (flow control). A broker with envelopes keeps the one it has, which
    # a concurrent lease may be fencing, and only puts the id back.
    reoffer: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class Ended:
    """An attempt that ended in this transaction (reported, reclaimed), or a pending job
    made final without one (cancelled, expired): what observers (metrics, logs) hear of
    it after commit, from values the transaction had in hand anyway."""

    id: str
    queue: str
    task: str
    status: str  # the job's new status (a JobStatus value)
    attempt: int
    worker: str | None = None
    ready_at: datetime | None = None  # when it became due (run_at before the lease)
    started_at: datetime | None = None  # when the lease was granted
    ended_at: datetime | None = None
    reclaimed: bool = False  # its lease ran out (or its worker was lost)
    # The lease that ended (None: none did): the Redis protocol's copy of the limit slots
    # it held frees after the commit (service/flow_redis.py).
    token: str | None = None
    limited: bool = False  # the job named limits (its queue's own may apply too)


@dataclass(slots=True)
class Effects:
    """What must happen after commit: jobs to dispatch, waiters to wake, a timer to set,
    running jobs whose workers must be told to stop."""

    dispatch: list[Dispatch] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    # Finished jobs as committed (every column), for this process's ``?wait=`` waiters
    # on them to answer with instead of reading them back (service/waiting.py). Only for
    # jobs a waiter here waits on; any other waiter reads.
    settled: dict[str, JobValues] = field(default_factory=dict)
    earliest_due: datetime | None = None
    deliveries: int = 0  # webhook outbox rows written: wake the delivery loop
    # Running jobs whose cancellation was requested: HTTP workers hear it in their
    # heartbeat answer; a broker whose workers bypass HTTP tells them itself.
    cancelling: list[str] = field(default_factory=list)
    # For observers (service/metrics.py): attempts and jobs that ended, and leases of
    # Redis-protocol workers recorded in SQL.
    ended: list[Ended] = field(default_factory=list)
    leases_recorded: int = 0
    # Queues where a key found full got a slot back (flow control): this process's SQL
    # waiters look again at once, not at their next 0.5 s recheck.
    reopened: set[str] = field(default_factory=set)
    # The broker already told the other replicas inside the transaction (a PostgreSQL
    # NOTIFY rides the commit: ``Broker.in_transaction``): no publish or announce after it.
    announced: bool = False
    # Settled jobs that carry a trace context, and when their settle began
    # (``time.time_ns()``): the service's ``celeriac settle`` spans (service/tracing.py).
    traced: list[JobValues] = field(default_factory=list)
    traced_since_ns: int = 0

    def trace(self, row: JobValues) -> None:
        if not self.traced:
            self.traced_since_ns = time.time_ns()
        self.traced.append(row)

    def due_at(self, when: datetime) -> None:
        if self.earliest_due is None or when < self.earliest_due:
            self.earliest_due = when

    def merge(self, part: Effects) -> None:
        self.dispatch += part.dispatch
        self.finished += part.finished
        self.settled |= part.settled
        self.deliveries += part.deliveries
        self.cancelling += part.cancelling
        if part.traced and not self.traced:
            self.traced_since_ns = part.traced_since_ns
        self.traced += part.traced
        self.ended += part.ended
        self.leases_recorded += part.leases_recorded
        self.reopened |= part.reopened
        self.announced = self.announced and part.announced  # else all of it, after commit
        if part.earliest_due is not None:
            self.due_at(part.earliest_due)
