"""The worker's leases and the heartbeat thread that keeps them alive.

A lease stays in the book from the moment its job is leased until its report is
acknowledged, so a finished job waiting for a slow report does not lose its lease.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable

from ._transport import BeatItem, Transport
from .context import JobContext
from .errors import CeleriacError, ServerUnreachable

logger = logging.getLogger("celeriac.worker")

# Bounds on a lease's length as seen here; guards against clock skew with the service.
MIN_LEASE = 1.5
MAX_LEASE = 3600.0
RETRY_AFTER_ERROR = 1.0


def next_beat_in(lease_left: float) -> float:
    """When (monotonic) to extend a lease with ``lease_left`` seconds to go: at a third
    of it, so two beats may fail before it is lost."""
    return time.monotonic() + min(MAX_LEASE, max(MIN_LEASE, lease_left)) / 3


class ActiveLease:
    """One job's lease. Two rights are handed out once each: ``settle()`` to report the
    job (its outcome, a time-limit failure, or on a cold shutdown its release), and
    ``end()`` to give back its pool slot (when it finished, or was abandoned at its hard
    time limit)."""

    __slots__ = ("_ended", "_settled", "context", "job_id", "lease_seconds", "next_beat",
                 "token")  # fmt: skip

    def __init__(
        self,
        job_id: str,
        token: str,
        context: JobContext,
        next_beat: float,
        lease_seconds: float | None = None,
    ) -> None:
        self.job_id = job_id
        self.token = token
        self.context = context
        self.next_beat = next_beat
        self.lease_seconds = lease_seconds
        self._settled = threading.Lock()
        self._ended = threading.Lock()

    def settle(self) -> bool:
        return self._settled.acquire(blocking=False)

    @property
    def settled(self) -> bool:
        return self._settled.locked()

    def end(self) -> bool:
        return self._ended.acquire(blocking=False)


class LeaseBook:
    """The leases this worker holds, shared by the leasing, pool, heartbeat, report and
    registry threads."""

    def __init__(self) -> None:
        self._leases: dict[str, ActiveLease] = {}
        self.changed = threading.Condition()
        self._wake_at = math.inf  # when the heartbeat thread will next look

    def add(self, leases: Iterable[ActiveLease]) -> None:
        with self.changed:
            for lease in leases:
                self._leases[lease.job_id] = lease
                if lease.next_beat < self._wake_at:
                    self._wake_at = lease.next_beat
                    self.changed.notify_all()

    def remove(self, job_ids: Iterable[str]) -> None:
        with self.changed:
            for job_id in job_ids:
                self._leases.pop(job_id, None)

    def snapshot(self) -> list[ActiveLease]:
        with self.changed:
            return list(self._leases.values())

    def job_ids(self) -> list[str]:
        with self.changed:
            return list(self._leases)

    def wait_until_due(self, stopped: threading.Event) -> bool:
        """Sleep until some lease needs a beat (True) or ``stopped`` is set (False)."""
        with self.changed:
            while not stopped.is_set():
                due = min((lease.next_beat for lease in self._leases.values()), default=math.inf)
                now = time.monotonic()
                if due <= now:
                    return True
                self._wake_at = due
                self.changed.wait(None if due == math.inf else due - now)
            return False


class Heartbeater:
    """Extends every held lease whenever the first of them is due (one call over HTTP, one
    pipeline over Redis), carrying progress, and passes cancel requests on to the tasks."""

    def __init__(self, transport: Transport, book: LeaseBook) -> None:
        self._transport = transport
        self._book = book
        self.stopped = threading.Event()

    def stop(self) -> None:
        self.stopped.set()
        with self._book.changed:
            self._book.changed.notify_all()

    def run(self) -> None:
        while self._book.wait_until_due(self.stopped):
            leases = self._book.snapshot()
            # Until an answer says otherwise (or if none comes), try again shortly.
            retry_at = time.monotonic() + RETRY_AFTER_ERROR
            for lease in leases:
                lease.next_beat = retry_at
            try:
                self._beat(leases)
            except (ServerUnreachable, CeleriacError) as exc:
                logger.warning("heartbeat of %d leases failed: %s", len(leases), exc)

    def _beat(self, leases: list[ActiveLease]) -> None:
        items = [
            BeatItem(lease.job_id, lease.token, lease.context.progress, lease.lease_seconds)
            for lease in leases
        ]
        by_id = {lease.job_id: lease for lease in leases}
        lost: list[str] = []
        for answer in self._transport.heartbeat(items):
            lease = by_id.get(answer.job_id)
            if lease is None:
                continue
            if not answer.ok:
                lost.append(lease.job_id)
            elif answer.lease_left is not None:
                lease.next_beat = next_beat_in(answer.lease_left)
            if answer.cancel_requested or not answer.ok:
                lease.context.request_cancel()
        if lost:
            logger.warning("lost the leases of jobs %s (re-leased or finished)", lost)
            self._book.remove(lost)
