"""The worker's leases and the heartbeat thread that keeps them alive.

A lease stays in the book from the moment its job is leased until its report is
acknowledged, so a finished job waiting for a slow report does not lose its lease.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from datetime import UTC, datetime
from typing import Any

from .client import Client
from .context import JobContext
from .errors import CeleriacError, ServerUnreachable

logger = logging.getLogger("celeriac.worker")

# Bounds on a lease's length as seen here; guards against clock skew with the service.
MIN_LEASE = 1.5
MAX_LEASE = 3600.0
RETRY_AFTER_ERROR = 1.0


def next_beat_for(expires_at: str) -> float:
    """When (monotonic) to extend a lease that ends at ``expires_at``: at a third of
    what is left, so two beats may fail before it is lost."""
    remaining = (datetime.fromisoformat(expires_at) - datetime.now(UTC)).total_seconds()
    return time.monotonic() + min(MAX_LEASE, max(MIN_LEASE, remaining)) / 3


class ActiveLease:
    """One job's lease. ``settle()`` hands out the right to report it exactly once:
    either its outcome or, on a cold shutdown, its release."""

    __slots__ = ("_settled", "context", "job_id", "next_beat", "token")

    def __init__(self, job_id: str, token: str, context: JobContext, next_beat: float) -> None:
        self.job_id = job_id
        self.token = token
        self.context = context
        self.next_beat = next_beat
        self._settled = threading.Lock()

    def settle(self) -> bool:
        return self._settled.acquire(blocking=False)

    @property
    def settled(self) -> bool:
        return self._settled.locked()


class LeaseBook:
    """The leases this worker holds, shared by the leasing, pool, heartbeat and report
    threads."""

    def __init__(self) -> None:
        self._leases: dict[str, ActiveLease] = {}
        self.changed = threading.Condition()
        self._wake_at = math.inf  # when the heartbeat thread will next look

    def add(self, lease: ActiveLease) -> None:
        with self.changed:
            self._leases[lease.job_id] = lease
            if lease.next_beat < self._wake_at:
                self.changed.notify_all()

    def remove(self, job_ids: list[str]) -> None:
        with self.changed:
            for job_id in job_ids:
                self._leases.pop(job_id, None)

    def snapshot(self) -> list[ActiveLease]:
        with self.changed:
            return list(self._leases.values())

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
    """Extends every held lease with one ``POST /leases/heartbeat`` whenever the first of
    them is due, carrying progress, and passes cancel requests on to the tasks."""

    def __init__(self, client: Client, book: LeaseBook, lease_seconds: float | None) -> None:
        self._client = client
        self._book = book
        self._lease_seconds = lease_seconds
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
        body: dict[str, Any] = {"leases": [_lease_ref(lease) for lease in leases]}
        if self._lease_seconds:
            body["lease_seconds"] = self._lease_seconds
        answer = self._client.request("POST", "/leases/heartbeat", json=body)
        by_id = {lease.job_id: lease for lease in leases}
        lost: list[str] = []
        for item in answer["leases"]:
            lease = by_id.get(item["id"])
            if lease is None:
                continue
            if not item["ok"]:
                lost.append(lease.job_id)
            elif item.get("expires_at"):
                lease.next_beat = next_beat_for(item["expires_at"])
            if item.get("cancel_requested") or not item["ok"]:
                lease.context.request_cancel()
        if lost:
            logger.warning("lost the leases of jobs %s (re-leased or finished)", lost)
            self._book.remove(lost)


def _lease_ref(lease: ActiveLease) -> dict[str, Any]:
    ref: dict[str, Any] = {"id": lease.job_id, "token": lease.token}
    if lease.context.progress is not None:
        ref["progress"] = lease.context.progress
    return ref
