"""The broker contract: a broker is a source of candidate job ids.

SQL is the system of record. A job's status, lease token and deadline live only in the
``jobs`` table and every lease is granted there, by ``service.dispatch`` (one module for
every broker: granting, waiting, the SQL top-up and the fallback while a broker is down).
A broker is a *dispatch index*: it knows which queued jobs to offer next and wakes
waiting workers without polling. It never grants a lease itself.

Guarantees every implementation keeps:

- ``candidates`` returns ids the broker believes are ready, queues in the order given,
  highest priority then oldest first within a queue, never a job before its ``run_at``
  (delayed jobs stay in SQL until the service promotes them). With nothing to offer it
  waits up to ``wait`` seconds for a publish (an event, never a poll). A candidate is
  only a hint: SQL decides, so a stale id (already granted, cancelled) costs one look.
  Every id of a batch is settled exactly once: ``ack`` (SQL granted it: drop it from
  the index) or ``hand_back`` (not granted: dropped if SQL says it is not leasable any
  more, offered again if it may still be ready: SQL failed, or held it back). Until
  then the broker keeps the ids from other hands.
  Raises ``BrokerUnavailable`` when the broker cannot be reached.
- ``publish`` is called after the commit that made jobs ready. It may fail or be lost
  (the process dies between commit and publish): ``reconcile`` repairs that from SQL
  within ``reconcile_interval_seconds``. Publishing a job twice is harmless. At least
  once, for the index: every queued job is offered, some more than once.
- ``announce`` tells other service replicas that jobs finished or that a timer moved
  (the messages of ``Announcements``). Best effort: waiters re-read SQL anyway.
- ``reconcile`` rebuilds whatever the index lost (restart, flush, failed push) from SQL.
  It is idempotent and safe to run on every replica at once.
- ``after_commit`` sees every commit's effects; a broker acts on what concerns its own
  workers (default: nothing).
- ``in_transaction`` sees a transaction's effects before its commit, in the database's
  thread. A broker whose messages can ride that transaction (a PostgreSQL NOTIFY is
  delivered at commit, and never without it) sends them there and sets
  ``effects.announced``: then ``publish`` and ``announce`` are not called for that
  commit, which saves a transaction of their own. Default: nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from service.db import Database
from service.effects import Dispatch, Effects
from service.signals import Signals

if TYPE_CHECKING:
    from service.pg_direct import DirectPg


class BrokerUnavailable(Exception):
    """The broker cannot be reached: dispatch serves from SQL meanwhile."""


async def _assume_flow_control() -> bool:
    return True


@dataclass(frozen=True)
class BrokerHooks:
    """What a broker may call back into: the database clock, and the after-commit effects
    of transactions it runs itself (events applied from workers that bypass HTTP)."""

    now: Callable[[], datetime]
    apply: Callable[[Effects], Awaitable[None]]
    # PostgreSQL's statements from the event loop (service/pg_direct.py), where they apply.
    direct: DirectPg | None = None
    # Whether flow control is configured, looked up again now and then (``flow.active_now``);
    # without it, assume so (the safe side: the pooled path, which writes limit slots).
    flow_active: Callable[[], Awaitable[bool]] = _assume_flow_control


class Candidates:
    """One answer of ``Broker.candidates``: ids in the order to grant them. The base
    class is a batch that needs no settling (an index that already removed them)."""

    # Whether ``ack`` may run after the lease is answered (without flow control): it only
    # tidies the index, since SQL's grant is what fences the jobs, and a late or lost ack
    # at worst offers a granted job again, which SQL then refuses.
    ack_may_wait = False

    def __init__(self, ids: Sequence[str] = ()) -> None:
        self.ids = list(dict.fromkeys(ids))

    async def ack(self, ids: Collection[str]) -> None:
        """SQL granted these: drop them from the index."""

    async def hand_back(self, ids: Collection[str], *, still_ready: bool) -> None:
        """Not granted. ``still_ready`` False: SQL found them not leasable (granted
        elsewhere, cancelled, expired): drop them; they are published again if they
        become ready. True: SQL could not decide or held them back: offer them again."""


class Broker(ABC):
    name: str
    # False only for the SQL broker: the jobs table is its index, and dispatch claims
    # from it in one statement instead of asking for candidates.
    holds_index: bool = True
    # True when workers lease from the index itself (the Redis worker protocol): SQL
    # hears of those leases late, so a job it still calls queued may be running. Then
    # dispatch never tops a short answer up from SQL while the broker answers.
    grants_outside_sql: bool = False

    def __init__(self, db: Database, signals: Signals) -> None:
        self.db = db
        self.signals = signals

    @abstractmethod
    async def start(self, hooks: BrokerHooks) -> None:
        """Connect and subscribe. Called once by the app's lifespan."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections. Called once at shutdown."""

    async def candidates(self, queues: Sequence[str], limit: int, wait: float) -> Candidates:
        """Up to ``limit`` ids believed ready; see the module's guarantees."""
        return Candidates()

    @abstractmethod
    async def publish(self, jobs: Sequence[Dispatch]) -> None: ...

    @abstractmethod
    async def announce(self, finished: Sequence[str], due: datetime | None) -> None: ...

    async def reconcile(self, now: datetime) -> int:
        """Repair the index from SQL; returns how many jobs it (re-)indexed."""
        return 0

    async def after_commit(self, effects: Effects) -> None:
        """A commit's effects, after the runtime applied them."""
        return None

    def in_transaction(self, session: Session, effects: Effects) -> None:
        """A transaction's effects, just before its commit (see the module's guarantees).
        Runs in the database's thread: no awaiting, no other I/O than ``session``."""
        return None

    def commit_notices(self, effects: Effects) -> list[tuple[str, str]]:
        """What ``in_transaction`` would send, as PostgreSQL NOTIFY ``(channel, payload)``
        pairs, for a commit made without a session (the submit pipeline,
        service/pg_pipeline.py); it marks ``effects.announced`` as ``in_transaction``
        does. A broker whose part is not a NOTIFY returns none and marks nothing."""
        return []

    @abstractmethod
    async def ping(self) -> None:
        """Raise if the broker cannot be reached."""


def chunks(values: Sequence[str], size: int) -> list[Sequence[str]]:
    """``values`` in slices of at most ``size``: the one way messages and IN lists are cut."""
    return [values[i : i + size] for i in range(0, len(values), size)]


class Announcements:
    """The one format of the messages replicas exchange (PostgreSQL NOTIFY, Redis pub/sub,
    the AMQP fanout): ``r:<queue>,…`` queues have ready jobs, ``f:<id>,…`` jobs finished,
    ``d:`` a timer moved. Each message stays under PostgreSQL's 8000-byte payload."""

    PER_MESSAGE = 7900 // 37  # a job id and its comma

    @classmethod
    def encode(cls, finished: Sequence[str], due: datetime | None) -> list[str]:
        messages = [f"f:{','.join(part)}" for part in chunks(finished, cls.PER_MESSAGE)]
        if due is not None:
            messages.append("d:")
        return messages

    @staticmethod
    def ready(queues: Iterable[str]) -> list[str]:
        return [f"r:{queue}" for queue in sorted(set(queues))]

    @staticmethod
    def apply(signals: Signals, payload: str) -> None:
        """Wake this process's waiters for one message; an unknown one is ignored."""
        kind, _, body = payload.partition(":")
        if kind == "r":
            signals.queues_ready(body.split(","))
        elif kind == "f":
            signals.jobs_finished(body.split(","))
        elif kind == "d":
            signals.due_at(None)
