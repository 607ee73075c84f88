"""Reporting finished jobs: the outbox the pools drop outcomes into, and the reporter
thread that sends them through the transport (``POST /leases/report``, or one Redis
pipeline).

Batching is natural: each request carries whatever finished while the previous one was
in flight, so a busy worker sends few large requests and an idle one reports at once.

Report-and-fetch: when the pool has room and the leaser is not already asking, a report
also asks for the next jobs (``Transport.report_and_lease``), so a busy worker makes one
request per batch rather than a report and a lease.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from queue import Empty, SimpleQueue

from ._execution import Report, error_info, failure
from ._leases import LeaseBook
from ._transport import Grant, Settled, Transport
from .errors import CeleriacError, ServerUnreachable, is_transient

logger = logging.getLogger("celeriac.worker")

MAX_BATCH_ITEMS = 1000
# Well under the service's default 1 MiB request limit; a bigger single report goes alone.
MAX_BATCH_BYTES = 512 * 1024
MAX_BACKOFF = 10.0


class Outbox:
    """Outcomes waiting to be sent. ``take`` blocks until there is something, and
    returns ``[]`` once closed and empty. A ``SimpleQueue``: pool threads only append, and
    on the hot path that must not contend for a lock with the reporter."""

    def __init__(self) -> None:
        self._items: SimpleQueue[Report | None] = SimpleQueue()  # None: closed
        self._next: Report | None = None  # taken but left for the next batch
        self._closed = False

    def put(self, report: Report) -> None:
        self._items.put(report)

    def close(self) -> None:
        self._items.put(None)

    def take(self) -> list[Report]:
        """The next batch: at most MAX_BATCH_ITEMS, and MAX_BATCH_BYTES unless one
        report alone is larger. Only the reporter thread calls this."""
        first, self._next = self._next, None
        if first is None:
            if self._closed:
                return []
            first = self._items.get()
            if first is None:
                self._closed = True
                return []
        batch, size = [first], first.size
        while len(batch) < MAX_BATCH_ITEMS and not self._closed:
            try:
                item = self._items.get_nowait()
            except Empty:
                break
            if item is None:
                self._closed = True
            elif size + item.size > MAX_BATCH_BYTES:
                self._next = item
                break
            else:
                batch.append(item)
                size += item.size
        return batch


@dataclass(frozen=True, slots=True)
class FetchHooks:
    """How a report asks for jobs: ``take_turn`` returns how many to lease (0: not now;
    else the leaser holds off until ``leased`` hands over what came, possibly nothing)."""

    take_turn: Callable[[], int]
    leased: Callable[[list[Grant]], None]


class Reporter:
    """Sends outcomes until the outbox is closed and drained. A request that gets no
    answer is retried (the leases stay in the book, so heartbeats keep them alive)
    until ``give_up`` is set."""

    def __init__(
        self,
        transport: Transport,
        outbox: Outbox,
        book: LeaseBook,
        on_done: Callable[[], None],
        fetch: FetchHooks | None = None,
    ) -> None:
        self._transport = transport
        self._outbox = outbox
        self._book = book
        self._on_done = on_done
        self._fetch = fetch
        self.give_up = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        try:
            while batch := self._outbox.take():
                self._deliver(batch)
                self._book.remove([report.job_id for report in batch])
        finally:
            self.done.set()
            self._on_done()

    def _deliver(self, batch: list[Report]) -> None:
        backoff = 0.1
        while not self.give_up.is_set():
            try:
                self._send(batch)
                return
            except (ServerUnreachable, CeleriacError) as exc:
                if isinstance(exc, CeleriacError) and not is_transient(exc):
                    self._rejected(batch, exc)
                    return
                logger.warning("reporting %d outcomes failed, will retry: %s", len(batch), exc)
            self.give_up.wait(backoff)
            backoff = min(MAX_BACKOFF, backoff * 2)
        logger.error("gave up reporting jobs %s", [report.job_id for report in batch])

    def _send(self, batch: list[Report]) -> None:
        started = time.monotonic()
        answers = self._report(batch)
        logger.debug("reported %d outcomes in %.3fs", len(batch), time.monotonic() - started)
        for answer in answers:
            if not answer.ok:
                logger.warning("report for job %s not applied: %s", answer.job_id, answer.detail)

    def _report(self, batch: list[Report]) -> list[Settled]:
        fetch = self._fetch
        room = fetch.take_turn() if fetch is not None else 0
        if fetch is None or not room:
            return self._transport.report(batch)
        grants: list[Grant] = []
        try:
            answers, grants = self._transport.report_and_lease(batch, room)
        finally:
            fetch.leased(grants)  # the leaser's turn again, whatever happened
        return answers

    def _rejected(self, batch: list[Report], exc: CeleriacError) -> None:
        if exc.status == 413 and len(batch) > 1:
            half = len(batch) // 2
            self._deliver(batch[:half])
            self._deliver(batch[half:])
        elif exc.status == 413:
            # One result too big for the service: the job fails instead of vanishing.
            job_id, token = batch[0].job_id, batch[0].token
            error = error_info("ResultTooLarge", f"the service refused the result: {exc}")
            self._deliver([failure(job_id, token, error, retry=False)])
        else:
            # A request the service will never accept: retrying would wedge later reports.
            logger.error("service rejected reports for %s: %s", [r.job_id for r in batch], exc)
