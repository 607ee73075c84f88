"""What a transaction leaves to do after its commit, and what a broker is given to index.

Its own module so that the domain modules (``jobs``, ``leases``) and the brokers all
depend on it and never on each other for these two records."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


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


@dataclass(slots=True)
class Effects:
    """What must happen after commit: jobs to dispatch, waiters to wake, a timer to set,
    running jobs whose workers must be told to stop."""

    dispatch: list[Dispatch] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    earliest_due: datetime | None = None
    deliveries: int = 0  # webhook outbox rows written: wake the delivery loop
    # Running jobs whose cancellation was requested: HTTP workers hear it in their
    # heartbeat answer; a broker whose workers bypass HTTP tells them itself.
    cancelling: list[str] = field(default_factory=list)

    def due_at(self, when: datetime) -> None:
        if self.earliest_due is None or when < self.earliest_due:
            self.earliest_due = when

    def merge(self, part: Effects) -> None:
        self.dispatch += part.dispatch
        self.finished += part.finished
        self.deliveries += part.deliveries
        self.cancelling += part.cancelling
        if part.earliest_due is not None:
            self.due_at(part.earliest_due)
