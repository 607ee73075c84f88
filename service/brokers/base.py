"""The broker contract: how ready jobs reach workers.

SQL is the system of record. A job's status, lease token and deadline live only in the
``jobs`` table and every lease is granted there (see ``service.leases``), so a broker can
never make a job run twice while its lease is alive. A broker is a *dispatch index*: it
knows which queued jobs to offer next and wakes waiting workers without polling.

Guarantees every implementation keeps:

- ``publish`` is called after the commit that made jobs ready. It may fail or be lost (the
  process dies between commit and publish): ``reconcile`` repairs that from SQL within
  ``reconcile_interval_seconds``. Publishing a job twice is harmless.
- ``lease`` returns jobs whose lease is committed in SQL, queues in the order given,
  highest priority then oldest first within a queue, never a job before its ``run_at``
  (delayed jobs stay in SQL until the service promotes them). With nothing ready it waits
  up to ``wait`` seconds for an event, not by re-querying in a loop.
- ``announce`` tells other service replicas that jobs finished or that a timer moved, so
  their result waiters and maintenance wake up. Best effort: waiters re-read SQL anyway.
- ``reconcile`` rebuilds whatever the index lost (restart, flush, failed push) from SQL.
  It is idempotent and safe to run on every replica at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from service.db import Database
from service.jobs import Dispatch
from service.leases import Effects, LeaseTerms
from service.models import JobValues
from service.signals import Signals


@dataclass(frozen=True)
class BrokerHooks:
    """What a broker may call back into: the database clock, and the after-commit effects
    of transactions it runs itself (events applied from workers that bypass HTTP)."""

    now: Callable[[], datetime]
    apply: Callable[[Effects], Awaitable[None]]


class Broker(ABC):
    name: str

    # False when events cannot reach other processes. Waiters never re-check SQL on a
    # timer of their own: such a broker must itself wake this process's lease waiters
    # and result waiters (``Signals``) for changes made elsewhere, as the SQL broker's
    # one shared poll per ``sql_poll_fallback_seconds`` does.
    @property
    def cross_process(self) -> bool:
        return True

    def __init__(self, db: Database, signals: Signals) -> None:
        self.db = db
        self.signals = signals

    @property
    def wants_envelopes(self) -> bool:
        """Whether ``publish`` needs each job's envelope (Redis worker protocol)."""
        return False

    @abstractmethod
    async def start(self, hooks: BrokerHooks) -> None:
        """Connect and subscribe. Called once by the app's lifespan."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections. Called once at shutdown."""

    @abstractmethod
    async def publish(self, jobs: Sequence[Dispatch]) -> None: ...

    @abstractmethod
    async def lease(
        self,
        queues: Sequence[str],
        max_jobs: int,
        wait: float,
        terms: Callable[[], LeaseTerms],
    ) -> list[JobValues]:
        """``terms`` is called for each attempt, so a lease granted late in a long-poll
        still gets its full length."""

    @abstractmethod
    async def announce(self, finished: Sequence[str], due: datetime | None) -> None: ...

    @abstractmethod
    async def reconcile(self, now: datetime) -> int:
        """Repair the index from SQL; returns how many jobs it (re-)indexed."""

    @abstractmethod
    async def cancel_requested(self, job_ids: Sequence[str]) -> None:
        """Tell workers holding these jobs (through the broker) to stop."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise if the broker cannot be reached."""
