"""In-process wake-ups on the event loop. Local writes and cross-process notifications
(PostgreSQL LISTEN/NOTIFY, Redis pub/sub) both land here, so a long-poll waits on an event
instead of re-querying."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import datetime


class Signals:
    def __init__(self) -> None:
        self._ready: dict[str, set[asyncio.Event]] = {}
        self._finished: dict[str, set[asyncio.Event]] = {}
        self.maintenance = asyncio.Event()
        self.earliest_due: datetime | None = None
        # Set when a schedule is created or changed here: the scheduler re-plans its sleep.
        self.schedules = asyncio.Event()
        # Set after a commit that wrote webhook deliveries: the delivery loop wakes.
        self.webhooks = asyncio.Event()
        # Set when any long-poll waiter registers: a broker whose events cannot reach
        # other processes re-checks SQL for all waiters at once while it is set.
        self.waiting = asyncio.Event()

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
        for queue in set(queues):
            for event in self._ready.get(queue, ()):
                event.set()

    def finished_waiter(self, job_id: str) -> asyncio.Event:
        event = asyncio.Event()
        self._finished.setdefault(job_id, set()).add(event)
        self.waiting.set()
        return event

    def drop_finished_waiter(self, job_id: str, event: asyncio.Event) -> None:
        _discard(self._finished, job_id, event)

    def jobs_finished(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            for event in self._finished.get(job_id, ()):
                event.set()

    def due_at(self, when: datetime | None) -> None:
        """Something becomes due at ``when`` (None: now): wake maintenance if that is
        earlier than what it sleeps towards."""
        if when is None or self.earliest_due is None or when < self.earliest_due:
            self.maintenance.set()


def _discard(index: dict[str, set[asyncio.Event]], key: str, event: asyncio.Event) -> None:
    waiters = index.get(key)
    if waiters is not None:
        waiters.discard(event)
        if not waiters:
            del index[key]
