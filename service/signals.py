"""In-process wake-ups on the event loop. Local writes and cross-process notifications
(PostgreSQL LISTEN/NOTIFY, Redis pub/sub) both land here, so a long-poll waits on an event
instead of re-querying."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from service.models import JobValues


class FinishedWaiter(asyncio.Event):
    """A ``?wait=`` waiter's wake-up. A settle in this process also leaves the job as it
    committed it (``job``), so the waiter answers without reading it back; a wake-up from
    elsewhere (NOTIFY, pub/sub, the shared poll) leaves None: read the job."""

    def __init__(self) -> None:
        super().__init__()
        self.job: JobValues | None = None


class Signals:
    def __init__(self) -> None:
        self._ready: dict[str, set[asyncio.Event]] = {}
        self._finished: dict[str, set[FinishedWaiter]] = {}
        self.maintenance = asyncio.Event()
        self.earliest_due: datetime | None = None
        # Set when a schedule is created or changed here: the scheduler re-plans its sleep.
        self.schedules = asyncio.Event()
        # Set after a commit that wrote webhook deliveries: the delivery loop wakes.
        self.webhooks = asyncio.Event()
        # Set when any long-poll waiter registers: a broker whose events cannot reach
        # other processes re-checks SQL for all waiters at once while it is set.
        self.waiting = asyncio.Event()
        # Moves whenever jobs may have become ready in some queue (a local commit, a
        # NOTIFY, the shared poll, a listener that reconnected): a claim that found its
        # queues drained at one value need not look again until it moves (dispatch).
        self.ready_generation = 0
        # Told of every finish this process hears of, local or from another replica, while
        # an events stream is open (service/events.py); None: nobody listens.
        self.on_finished: Callable[[list[str]], None] | None = None
        # Set when the service is stopping (``drain``): long-polls answer at once.
        self.stopping = asyncio.Event()

    # A waiter registers *before* it checks the database, so a wake-up that lands between
    # its check and its wait is never lost.
    def ready_waiter(self, queues: Iterable[str]) -> asyncio.Event:
        event = asyncio.Event()
        for queue in queues:
            self._ready.setdefault(queue, set()).add(event)
        self.waiting.set()
        return event

    def drop_ready_waiter(self, queues: Iterable[str], event: asyncio.Event) -> None:
        for queue in queues:
            _discard(self._ready, queue, event)

    def waited_queues(self) -> list[str]:
        """The queues some lease in this process is waiting on."""
        return list(self._ready)

    def waited_jobs(self) -> list[str]:
        """The job ids some ``GET /jobs/{id}?wait=`` in this process is waiting on."""
        return list(self._finished)

    def queues_ready(self, queues: Iterable[str]) -> None:
        self.ready_generation += 1
        for queue in set(queues):
            for event in self._ready.get(queue, ()):
                event.set()

    def wake_everyone(self) -> None:
        """Notifications may have been missed (a LISTEN connection came back): every
        lease waiter and maintenance look again."""
        self.queues_ready(list(self._ready))
        self.due_at(None)

    def finished_waiter(self, job_id: str) -> FinishedWaiter:
        event = FinishedWaiter()
        self._finished.setdefault(job_id, set()).add(event)
        self.waiting.set()
        return event

    def drop_finished_waiter(self, job_id: str, event: FinishedWaiter) -> None:
        _discard(self._finished, job_id, event)

    def is_waited(self, job_id: str) -> bool:
        """Whether a ``?wait=`` here waits on the job. Safe from a database thread (one
        dict look-up): a settle asks it to decide whether to keep the settled row for the
        waiter. A waiter that registers just after the answer was no is woken without the
        row and reads it, as it would be from another process."""
        return job_id in self._finished

    def jobs_finished(
        self, job_ids: Iterable[str], settled: Mapping[str, JobValues] | None = None
    ) -> None:
        """Wake the waiters of these jobs; ``settled``: the jobs as just committed, for
        the waiters to answer with (those missing from it are read back)."""
        if self.on_finished is not None:
            job_ids = list(job_ids)
            self.on_finished(job_ids)
        for job_id in job_ids:
            job = settled.get(job_id) if settled else None
            for event in self._finished.get(job_id, ()):
                if job is not None:
                    event.job = job
                event.set()

    @property
    def draining(self) -> bool:
        return self.stopping.is_set()

    def drain(self) -> None:
        """The service was told to stop: every long-poll here answers now with what it
        has (a ``?wait=`` the job as it is, a lease its jobs so far, none), and new ones do
        not wait. Otherwise the server's graceful shutdown would cut them off after its
        timeout, and a request cut off answers 500."""
        self.stopping.set()
        for finished in self._finished.values():
            for waiter in finished:
                waiter.set()
        for ready in self._ready.values():
            for event in ready:
                event.set()

    def due_at(self, when: datetime | None) -> None:
        """Something becomes due at ``when`` (None: now): wake maintenance if that is
        earlier than what it sleeps towards."""
        if when is None or self.earliest_due is None or when < self.earliest_due:
            self.maintenance.set()


def _discard(index: dict[str, set[Any]], key: str, event: asyncio.Event) -> None:
    waiters = index.get(key)
    if waiters is not None:
        waiters.discard(event)
        if not waiters:
            del index[key]
